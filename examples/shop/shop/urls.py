from django.urls import path

from store import views

urlpatterns = [
    path("products", views.products),
    path("products/<int:product_id>", views.product),
    path("orders", views.place_order),
    path("orders.csv", views.orders_csv),
]
