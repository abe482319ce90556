"""``POST /orders/<n>``: enqueue the job ``shop.record`` (registered only in shop/tasks.py, found by autodiscovery)."""

import os

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from threaddispatch.contrib.django import get_engine


@csrf_exempt
@require_POST
def order(request: HttpRequest, n: int) -> JsonResponse:
    return JsonResponse({"job": get_engine().enqueue("shop.record", {"n": n}), "pid": os.getpid()})
