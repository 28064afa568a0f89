"""The shop's JSON API: products, orders placed in a transaction, and a streamed CSV export."""

import csv
import itertools
import json

from django.db import transaction
from django.http import Http404, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from .models import Order, Product


@require_GET
def products(request):
    return JsonResponse({"products": [p.as_json() for p in Product.objects.order_by("name")]})


@require_GET
def product(request, product_id):
    try:
        return JsonResponse(Product.objects.get(pk=product_id).as_json())
    except Product.DoesNotExist:
        raise Http404("no product %d" % product_id) from None


@csrf_exempt  # an API for programs, not a form
@require_POST
def place_order(request):
    """Take *quantity* of *product* from the stock, or answer 409 if there is not that much left.

    The product's row is locked for the transaction (select_for_update), so
    orders racing for the last units, from any worker and thread, never
    take more than there is.
    """
    try:
        fields = json.loads(request.body)
        product_id, quantity = int(fields["product"]), int(fields["quantity"])
    except (ValueError, KeyError, TypeError):
        return JsonResponse({"error": 'send JSON: {"product": ID, "quantity": N}'}, status=400)
    if quantity < 1:
        return JsonResponse({"error": "the quantity must be at least 1"}, status=400)
    with transaction.atomic():
        try:
            item = Product.objects.select_for_update().get(pk=product_id)
        except Product.DoesNotExist:
            raise Http404("no product %d" % product_id) from None
        if item.stock < quantity:
            return JsonResponse({"error": "only %d left" % item.stock}, status=409)
        item.stock -= quantity
        item.save(update_fields=["stock"])
        order = Order.objects.create(product=item, quantity=quantity)
    return JsonResponse({"order": order.id, "left": item.stock}, status=201)


class _Echo:
    def write(self, value):
        return value


@require_GET
def orders_csv(request):
    """Every order, streamed: .iterator() reads them from a server-side cursor, a chunk at a time."""
    writer = csv.writer(_Echo())
    rows = Order.objects.order_by("id").values_list("id", "product__name", "quantity", "placed_at")
    lines = (writer.writerow(row) for row in rows.iterator(chunk_size=500))
    header = writer.writerow(["order", "product", "quantity", "placed_at"])
    return StreamingHttpResponse(itertools.chain([header], lines), content_type="text/csv")
