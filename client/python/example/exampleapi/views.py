"""Example endpoints. Every /api/ and /webhooks/ request has been checked by
warden before a view runs; `request.warden` says who called."""

import json

from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework.response import Response
from rest_framework.views import APIView

from warden_client.django.drf import WardenAuthentication, WardenThrottle


def health(request):
    return JsonResponse({"ok": True})


@csrf_exempt
def orders(request):
    caller = request.warden
    return JsonResponse(
        {
            "key_id": caller.key_id if caller else None,
            "owner": caller.owner if caller else None,
            "scopes": list(caller.scopes) if caller else [],
        }
    )


@csrf_exempt
def billing_webhook(request):
    # Reached only by the key bound to the billing partner's certificate.
    event = json.loads(request.body or b"{}")
    return JsonResponse({"received": event.get("type")})


@csrf_exempt
def login(request):
    # The per-IP limit was applied by warden; a real app checks a password.
    return JsonResponse({"ok": True})


class ItemsView(APIView):
    authentication_classes = [WardenAuthentication]
    throttle_classes = [WardenThrottle]
    throttle_scope = "items"

    def get(self, request):
        return Response({"items": ["a", "b"], "key_id": request.user.key_id})
