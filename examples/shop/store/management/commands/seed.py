"""``python manage.py seed``: empty the shop and stock its products again."""

from decimal import Decimal

from django.core.management.base import BaseCommand
from django.db import transaction

from store.models import Order, Product

PRODUCTS = [
    ("Espresso beans, 1 kg", Decimal("24.00")),
    ("Grinder", Decimal("129.00")),
    ("Milk jug", Decimal("12.50")),
    ("Tamper", Decimal("19.90")),
    ("Cleaning tablets", Decimal("8.75")),
]


class Command(BaseCommand):
    help = "Delete every order and product, then add the sample products, each with --stock units."

    def add_arguments(self, parser):
        parser.add_argument("--stock", type=int, default=40)

    @transaction.atomic
    def handle(self, *args, stock, **options):
        Order.objects.all().delete()
        Product.objects.all().delete()
        Product.objects.bulk_create(Product(name=name, price=price, stock=stock) for name, price in PRODUCTS)
        self.stdout.write("%d products with %d each in stock" % (len(PRODUCTS), stock))
