from django.db import models


class Product(models.Model):
    name = models.CharField(max_length=100, unique=True)
    price = models.DecimalField(max_digits=8, decimal_places=2)
    stock = models.PositiveIntegerField()

    def as_json(self):
        return {"id": self.id, "name": self.name, "price": str(self.price), "stock": self.stock}


class Order(models.Model):
    product = models.ForeignKey(Product, on_delete=models.PROTECT, related_name="orders")
    quantity = models.PositiveIntegerField()
    placed_at = models.DateTimeField(auto_now_add=True)
