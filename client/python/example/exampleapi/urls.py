from django.urls import path, re_path

from exampleapi import views

urlpatterns = [
    path("health", views.health),
    path("api/orders", views.orders),
    path("api/async/orders", views.orders_async),
    # With or without a trailing slash: ROUTE_LIMITS names the view, so
    # both spellings spend one per-IP limit.
    re_path(r"^api/login/?$", views.login, name="login"),
    path("api/items", views.ItemsView.as_view()),
    path("webhooks/billing", views.billing_webhook),
    path("webhooks/stripe", views.stripe_webhook),
    path("webhooks/github", views.github_webhook),
]
