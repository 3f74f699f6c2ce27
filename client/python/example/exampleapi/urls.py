from django.urls import path

from exampleapi import views

urlpatterns = [
    path("health", views.health),
    path("api/orders", views.orders),
    path("api/async/orders", views.orders_async),
    path("api/login", views.login),
    path("api/items", views.ItemsView.as_view()),
    path("webhooks/billing", views.billing_webhook),
    path("webhooks/stripe", views.stripe_webhook),
    path("webhooks/github", views.github_webhook),
]
