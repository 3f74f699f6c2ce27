"""Example endpoints. Every /api/ and /webhooks/ request has been checked by
warden before a view runs; `request.warden` says who called."""

import json

from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework.response import Response
from rest_framework.views import APIView

from warden_client.django.drf import WardenAuthentication, WardenThrottle
from warden_client.django.webhooks import warden_webhook


def health(request):
    return JsonResponse({"ok": True})


def _caller(request):
    caller = request.warden
    return {
        "key_id": caller.key_id if caller else None,
        "owner": caller.owner if caller else None,
        "scopes": list(caller.scopes) if caller else [],
    }


@csrf_exempt
def orders(request):
    return JsonResponse(_caller(request))


@csrf_exempt
async def orders_async(request):
    """The same as an async view: under ASGI, neither it nor warden's check
    needs a thread."""
    return JsonResponse(_caller(request))


# The scope only the billing partner's key holds. Create that key bound to
# the partner's certificate (README): warden then refuses it from any other
# client, and this view refuses every key without the scope.
BILLING_WEBHOOK_SCOPE = "billing:webhook"


@csrf_exempt
def billing_webhook(request):
    if request.warden is None or BILLING_WEBHOOK_SCOPE not in request.warden.scopes:
        return JsonResponse({"error": "forbidden", "message": "Not the billing partner's key."}, status=403)
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


# Webhooks from providers, verified by warden with the provider's secret
# (imported once: `warden keys create --id wh_stripe --secret-stdin`); the
# app never holds it. A delivery seen before answers 200 "duplicate" and
# does not run the view again.
RECEIVED = []


@csrf_exempt
@warden_webhook("stripe")
def stripe_webhook(request):
    event = json.loads(request.body)
    RECEIVED.append(("stripe", event.get("id")))
    return JsonResponse({"received": event.get("type")})


@csrf_exempt
@warden_webhook("github")
def github_webhook(request):
    event = request.headers.get("X-GitHub-Event", "")
    RECEIVED.append(("github", event))
    return JsonResponse({"received": event})
