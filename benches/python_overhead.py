"""Per-request overhead of warden's Django middleware, side by side with the
Redis recipe it replaces (INCR + EXPIRE + SET NX EX, pipelined, and an HMAC
compare in Python), on the same machine.

    .venv/bin/python benches/python_overhead.py [--requests 3000]

Starts its own `warden serve --dev` (release build) and redis-server on
127.0.0.1 and stops them. Each variant serves the same signed requests
through Django's test client; overhead = time per request minus the time of
the same view without any check.

Then the same under ASGI (Django's async test client, an async view;
`--in-flight N` sends N requests at once, 1 by default):
warden's middleware in async mode (each transport; the compiled one also
with BUSY_WAIT_US = 0, which hands every check to its thread), the same middleware
made sync-only (as it was before it could run async: Django runs its check
on a thread), and the Redis recipe written async (redis.asyncio).

Last, each client's call alone in a loop, outside Django (median per
call): what a request pays when nothing else is in flight, without
Django's own work around it, which on a VM swings the numbers above by
more than the differences between clients.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "client" / "python"))

import django  # noqa: E402
from django.conf import settings  # noqa: E402
from django.http import JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402


def view(request):
    return JsonResponse({"ok": True})


async def async_view(request):
    return JsonResponse({"ok": True})


urlpatterns = [path(f"{p}/orders", view) for p in ("b", "w", "r")] + [
    path(f"a{p}/orders", async_view) for p in ("b", "w", "r")
]

REDIS = None
ASYNC_REDIS = None
SECRETS: dict[str, bytes] = {}
LIMIT = 10**9


def recipe_verdict(request):
    """The recipe's work before Redis: a refusal, or the key id and nonce."""
    from warden_client.signing import string_to_sign

    meta = request.META
    key_id, ts, nonce, sig = (meta.get(h, "") for h in ("HTTP_X_KEY_ID", "HTTP_X_TIMESTAMP", "HTTP_X_NONCE", "HTTP_X_SIGNATURE"))
    secret = SECRETS.get(key_id)
    if secret is None or not ts.isdigit() or abs(time.time() - int(ts)) > 300:
        return JsonResponse({"error": "unauthenticated"}, status=401)
    message = string_to_sign(int(ts), nonce, request.method, request.path, meta.get("QUERY_STRING", ""), request.body)
    if not hmac.compare_digest(hmac.new(secret, message.encode(), hashlib.sha256).hexdigest(), sig):
        return JsonResponse({"error": "unauthenticated"}, status=401)
    return key_id, nonce


def recipe_pipeline(redis, key_id, nonce):
    window = int(time.time()) // 60
    pipe = redis.pipeline(transaction=False)
    pipe.incr(f"rl:{key_id}:{window}")
    pipe.expire(f"rl:{key_id}:{window}", 60, nx=True)
    pipe.set(f"nonce:{key_id}:{nonce}", 1, nx=True, ex=300)
    return pipe


def recipe_answer(count, fresh):
    if not fresh:
        return JsonResponse({"error": "replay"}, status=401)
    if count > LIMIT:
        return JsonResponse({"error": "rate_limited"}, status=429)
    return None


class RedisRecipeMiddleware:
    """What Django teams write today: HMAC compare in Python, then a
    rate-limit counter and a nonce in Redis, one pipelined round trip."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if not request.path.startswith("/r/"):
            return self.get_response(request)
        verdict = recipe_verdict(request)
        if not isinstance(verdict, tuple):
            return verdict
        count, _, fresh = recipe_pipeline(REDIS, *verdict).execute()
        return recipe_answer(count, fresh) or self.get_response(request)


class AsyncRedisRecipeMiddleware:
    """The recipe as an async Django team writes it: redis.asyncio."""

    sync_capable = False
    async_capable = True

    def __init__(self, get_response):
        from asgiref.sync import markcoroutinefunction

        self.get_response = get_response
        markcoroutinefunction(self)

    async def __call__(self, request):
        if not request.path.startswith("/ar/"):
            return await self.get_response(request)
        verdict = recipe_verdict(request)
        if not isinstance(verdict, tuple):
            return verdict
        count, _, fresh = await recipe_pipeline(ASYNC_REDIS, *verdict).execute()
        return recipe_answer(count, fresh) or await self.get_response(request)


def sync_only_warden_middleware():
    from warden_client.django import WardenMiddleware

    class SyncOnlyWardenMiddleware(WardenMiddleware):
        """warden's middleware as it was before it could run async."""

        async_capable = False

    return SyncOnlyWardenMiddleware


def __getattr__(name):
    # Imported by Django from MIDDLEWARE, after settings are configured.
    if name == "SyncOnlyWardenMiddleware":
        return sync_only_warden_middleware()
    raise AttributeError(name)


def lone_calls(args, addr, dev, key, body) -> dict[str, float]:
    """Each client's round trip alone, in a loop: what a request pays when
    nothing else is in flight. The median of `--requests` calls, after 100
    to warm up."""
    import asyncio
    import statistics

    import redis
    import redis.asyncio

    from warden_client import AsyncWardenClient, CheckRequest, WardenClient
    from warden_client.signing import sign_request

    tls = {"cert": str(dev / "client.pem"), "key": str(dev / "client-key.pem"), "ca": str(dev / "ca.pem")}

    def requests():
        """Signed before the loop, as the Django rows' are."""
        signed = []
        for _ in range(args.requests):
            h = sign_request(key["key_id"], key["secret"], "POST", "/lone/orders", "", body)
            signed.append(CheckRequest(key_id=h["X-Key-Id"], timestamp=int(h["X-Timestamp"]), nonce=h["X-Nonce"],
                                       signature=h["X-Signature"], method="POST", path="/lone/orders", body=body))
        return signed

    def median_us(call, items) -> float:
        times = []
        for item in items:
            t = time.perf_counter()
            call(item)
            times.append(time.perf_counter() - t)
        return statistics.median(times[100:]) * 1e6

    async def async_median_us(call, items) -> float:
        times = []
        for item in items:
            t = time.perf_counter()
            await call(item)
            times.append(time.perf_counter() - t)
        return statistics.median(times[100:]) * 1e6

    def lone_nonce(n):
        return f"{n}:{time.time()}"

    out = {}
    client = WardenClient(addr, transport="native", **tls)

    def check(req):
        assert client.check(req).allowed

    out["WardenClient.check, compiled transport"] = median_us(check, requests())
    client.close()
    sync_redis = redis.Redis(host="127.0.0.1", port=args.redis_port)
    out["Redis recipe's pipeline, redis-py"] = median_us(
        lambda n: recipe_pipeline(sync_redis, "lone", lone_nonce(n)).execute(), range(args.requests))

    async def async_warden(busy_wait_us):
        c = AsyncWardenClient(addr, transport="native", busy_wait_us=busy_wait_us, **tls)

        async def check(req):
            assert (await c.check(req)).allowed

        us = await async_median_us(check, requests())
        await c.close()
        return us

    async def async_redis():
        r = redis.asyncio.Redis(host="127.0.0.1", port=args.redis_port)
        us = await async_median_us(lambda n: recipe_pipeline(r, "lone", lone_nonce(n)).execute(), range(args.requests))
        await r.aclose()
        return us

    out["AsyncWardenClient.check, compiled transport"] = asyncio.run(async_warden(200))
    out["the same, busy_wait_us=0 (handed to the transport's thread)"] = asyncio.run(async_warden(0))
    out["Redis recipe's pipeline, redis.asyncio"] = asyncio.run(async_redis())
    return out


def start(args, out_path):
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    while True:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"{args[0]} did not start")
        if line.startswith("listening on "):
            return proc, line.split()[2]


def main() -> None:
    global REDIS, ASYNC_REDIS
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--redis-port", type=int, default=6398)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--in-flight", type=int, default=1,
                        help="requests in flight at once under ASGI (gathered in groups of this many)")
    args = parser.parse_args()

    import redis
    import redis.asyncio

    subprocess.run(["cargo", "build", "-q", "--release", "-p", "warden-server"], cwd=REPO, check=True)
    tmp = Path(tempfile.mkdtemp())
    warden, addr = start([str(REPO / "target/release/warden"), "serve", "--dev", "--dev-dir", str(tmp / "dev"),
                          "--listen", "127.0.0.1:0", "--metrics-listen", "off"], tmp)
    subprocess.run(["redis-server", "--port", str(args.redis_port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--daemonize", "yes"], check=True, stdout=subprocess.DEVNULL)
    try:
        # Requests signed before the restart fence (start + future_skew + 1 s)
        # are STALE: wait it out.
        time.sleep(7)
        REDIS = redis.Redis(host="127.0.0.1", port=args.redis_port)
        ASYNC_REDIS = redis.asyncio.Redis(host="127.0.0.1", port=args.redis_port)
        for _ in range(50):
            try:
                REDIS.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        dev = tmp / "dev"
        subprocess.run([str(REPO / "target/release/warden"), "policies", "put", "bench", "--limit", "1000000000",
                        "--period", "1s", "--dev-dir", str(dev)], check=True, stdout=subprocess.DEVNULL)
        key = json.loads(subprocess.run([str(REPO / "target/release/warden"), "keys", "create", "--owner", "bench",
                                         "--policy", "bench", "--json", "--dev-dir", str(dev)],
                                        check=True, capture_output=True, text=True).stdout)
        SECRETS[key["key_id"]] = key["secret"].encode()

        settings.configure(
            DEBUG=False, SECRET_KEY="bench", ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__,
            MIDDLEWARE=["warden_client.django.WardenMiddleware", f"{__name__}.RedisRecipeMiddleware"],
            INSTALLED_APPS=[],
            WARDEN={"TARGET": addr, "CA": str(dev / "ca.pem"), "CERT": str(dev / "client.pem"),
                    "KEY": str(dev / "client-key.pem"), "PROTECTED_PATHS": ["/w/", "/aw/"], "TIMEOUT": 2.0},
        )
        django.setup()
        from django.test import Client

        from warden_client.signing import sign_request

        client = Client()
        body = b'{"qty": 1}' * 10

        def run(prefix: str) -> float:
            reqs = []
            for _ in range(args.requests):
                h = sign_request(key["key_id"], key["secret"], "POST", f"/{prefix}/orders", "", body)
                reqs.append({f"HTTP_{k.upper().replace('-', '_')}": v for k, v in h.items()})
            for h in reqs[:100]:  # warm up (connections, imports)
                client.post(f"/{prefix}/orders", data=body, content_type="application/json", **h)
            started, cpu = time.perf_counter(), time.process_time()
            for h in reqs[100:]:
                r = client.post(f"/{prefix}/orders", data=body, content_type="application/json", **h)
                assert r.status_code == 200, (prefix, r.status_code, r.content)
            n = len(reqs) - 100
            cpu_us[prefix] = (time.process_time() - cpu) / n * 1e6
            return (time.perf_counter() - started) / n * 1e6

        cpu_us: dict[str, float] = {}

        from warden_client.client import native_transport_available

        base = run("b")
        warden_us, warden_cpu_us = {}, {}
        for transport in ("native", "grpcio"):
            if transport == "native" and not native_transport_available():
                print("warden-client-native is not installed: the compiled transport is not measured", file=sys.stderr)
                continue
            settings.WARDEN = {**settings.WARDEN, "TRANSPORT": transport}
            warden_us[transport] = run("w")
            warden_cpu_us[transport] = cpu_us["w"]
        redis_us = run("r")

        # Under ASGI: Django's async test client, an async view, and each
        # variant's middleware alone (the handler loads MIDDLEWARE anew).
        import asyncio

        from django.test import AsyncClient

        def run_async(prefix: str, middleware: list[str]) -> float:
            settings.MIDDLEWARE = middleware
            aclient = AsyncClient()
            reqs = [sign_request(key["key_id"], key["secret"], "POST", f"/{prefix}/orders", "", body)
                    for _ in range(args.requests)]

            async def one(h):
                r = await aclient.post(f"/{prefix}/orders", data=body, content_type="application/json", headers=h)
                assert r.status_code == 200, (prefix, r.status_code, r.content)

            async def serve(batch):
                for i in range(0, len(batch), args.in_flight):
                    await asyncio.gather(*[one(h) for h in batch[i:i + args.in_flight]])

            async def measured():
                await serve(reqs[:100])  # warm up (connections, imports)
                started, cpu = time.perf_counter(), time.process_time()
                await serve(reqs[100:])
                n = len(reqs) - 100
                cpu_us[prefix] = (time.process_time() - cpu) / n * 1e6
                return (time.perf_counter() - started) / n * 1e6

            return asyncio.run(measured())

        warden_mw = "warden_client.django.WardenMiddleware"
        asgi = {"baseline": run_async("ab", [])}
        asgi_cpu = {"baseline": cpu_us["ab"]}
        for transport in warden_us:
            settings.WARDEN = {**settings.WARDEN, "TRANSPORT": transport}
            asgi[f"warden_async_{transport}"] = run_async("aw", [warden_mw])
            asgi_cpu[f"warden_async_{transport}"] = cpu_us["aw"]
            if transport == "native":
                # Every check handed to the transport's thread at once, as
                # every async check was before session 31.
                settings.WARDEN = {**settings.WARDEN, "BUSY_WAIT_US": 0}
                asgi["warden_async_native_handed"] = run_async("aw", [warden_mw])
                asgi_cpu["warden_async_native_handed"] = cpu_us["aw"]
                settings.WARDEN = {k: v for k, v in settings.WARDEN.items() if k != "BUSY_WAIT_US"}
        settings.WARDEN = {**settings.WARDEN, "TRANSPORT": next(iter(warden_us))}
        asgi["warden_sync_only"] = run_async("aw", [f"{__name__}.SyncOnlyWardenMiddleware"])
        asgi_cpu["warden_sync_only"] = cpu_us["aw"]
        # redis.asyncio's connections belong to the loop that made them.
        ASYNC_REDIS = redis.asyncio.Redis(host="127.0.0.1", port=args.redis_port)
        asgi["redis_recipe_async"] = run_async("ar", [f"{__name__}.AsyncRedisRecipeMiddleware"])
        asgi_cpu["redis_recipe_async"] = cpu_us["ar"]
        result = {
            "requests": args.requests,
            "baseline_us": base,
            "redis_recipe_us": redis_us,
            "redis_recipe_overhead_us": redis_us - base,
            "baseline_cpu_us": cpu_us["b"],
            "redis_recipe_cpu_us": cpu_us["r"],
        }
        for transport, us in warden_us.items():
            result[f"warden_middleware_{transport}_us"] = us
            result[f"warden_overhead_{transport}_us"] = us - base
            result[f"warden_middleware_{transport}_cpu_us"] = warden_cpu_us[transport]
        result["asgi_in_flight"] = args.in_flight
        for variant, us in asgi.items():
            result[f"asgi_{variant}_us"] = us
            result[f"asgi_{variant}_cpu_us"] = asgi_cpu[variant]
        lone = lone_calls(args, addr, dev, key, body) if "native" in warden_us else {}
        result["lone_calls_median_us"] = lone
        if args.json:
            print(json.dumps(result))
        else:
            print("| variant | µs per request | overhead µs | Django process CPU µs per request |")
            print("|---|---|---|---|")
            print(f"| no check (baseline) | {base:.0f} | – | {cpu_us['b']:.0f} |")
            for transport, us in warden_us.items():
                name = {"native": "compiled transport (warden-client-native)", "grpcio": "grpcio"}[transport]
                print(f"| warden middleware (one Check over mTLS, {name}) | {us:.0f} | {us - base:.0f} | "
                      f"{warden_cpu_us[transport]:.0f} |")
            print(f"| Redis recipe (HMAC in Python + pipelined INCR/EXPIRE/SET NX) | {redis_us:.0f} | {redis_us - base:.0f} | "
                  f"{cpu_us['r']:.0f} |")
            print()
            print(f"Under ASGI (Django's async test client, async view), {args.in_flight} in flight:")
            print()
            print("| variant | µs per request | overhead µs | Django process CPU µs per request |")
            print("|---|---|---|---|")
            names = {
                "baseline": "no check (baseline)",
                "warden_async_native": "warden middleware, async, compiled transport",
                "warden_async_native_handed": "the same, BUSY_WAIT_US = 0 (every check handed to the transport's thread)",
                "warden_async_grpcio": "warden middleware, async, grpc.aio",
                "warden_sync_only": f"warden middleware made sync-only ({next(iter(warden_us))}; Django runs it on a thread)",
                "redis_recipe_async": "Redis recipe, async (redis.asyncio)",
            }
            for variant, us in asgi.items():
                overhead = "–" if variant == "baseline" else f"{us - asgi['baseline']:.0f}"
                print(f"| {names[variant]} | {us:.0f} | {overhead} | {asgi_cpu[variant]:.0f} |")
            if lone:
                print()
                print("One call at a time in a loop, outside Django (median µs per call):")
                print()
                print("| call | median µs |")
                print("|---|---|")
                for name, us in lone.items():
                    print(f"| {name} | {us:.0f} |")
    finally:
        warden.terminate()
        subprocess.run(["redis-cli", "-p", str(args.redis_port), "shutdown", "nosave"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
