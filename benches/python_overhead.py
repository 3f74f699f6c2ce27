"""Per-request overhead of warden's Django middleware, side by side with the
Redis recipe it replaces (INCR + EXPIRE + SET NX EX, pipelined, and an HMAC
compare in Python), on the same machine.

    .venv/bin/python benches/python_overhead.py [--requests 3000]

Starts its own `warden serve --dev` (release build) and redis-server on
127.0.0.1 and stops them. Each variant serves the same signed requests
through Django's test client; overhead = time per request minus the time of
the same view without any check, in the same round: the requests are split
into `--rounds` rounds (10), every variant once a round in a turning order,
so that the VM's slow minutes fall on all of them alike. A round's time
per request is its median request (one at a time) or its total over its
requests (`--in-flight` above 1: they overlap). Each table gives the median
over the rounds and the range, and in how many rounds warden cost less
than the recipe; then the check's own round trip inside Django, warden's
client call against the recipe's Redis pipeline.

Then the same under ASGI (Django's async test client, an async view;
`--in-flight N` sends N requests at once, 1 by default):
warden's middleware in async mode (each transport; the compiled one also
with BUSY_WAIT_US = 0, which hands every check to its thread, and with
RATELIMIT_HEADERS = False, which sends no more headers than the recipe), the same middleware
made sync-only (as it was before it could run async: Django runs its check
on a thread), and the Redis recipe written async (redis.asyncio).

Last, each client's call alone in a loop, outside Django (median per
call): what a request pays when nothing else is in flight, without
Django's own work around it, which on a VM swings the numbers above by
more than the differences between clients.

`--phases` (one at a time only) also splits each ASGI request into where
its time went, medians per variant: Django before the middleware, the
middleware before its call, the call, from the call to the view, the view
and the way back out through the middleware, and Django after it. A
middleware of the script's own, outermost in every ASGI variant, marks
the middleware's start and end (a few µs more for every variant alike).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import statistics
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
    mark("view")
    return JsonResponse({"ok": True})


urlpatterns = [path(f"{p}/orders", view) for p in ("b", "w", "r")] + [
    path(f"a{p}/orders", async_view) for p in ("b", "w", "r")
]

REDIS = None
ASYNC_REDIS = None
SECRETS: dict[str, bytes] = {}
LIMIT = 10**9

# The check's own round trip inside Django, per variant: warden's client
# call (request built, sent, answered, read into a Decision) and the
# recipe's pipeline (sent, answered). The variant being measured; None
# while warming up.
MEASURING: list[str | None] = [None]
ROUND_TRIPS: dict[str, list[float]] = {}


# With --phases: the marks of the ASGI request being measured (one at a
# time), by name, and every measured request's marks, per variant.
MARKS: list[dict[str, float] | None] = [None]
PHASES: dict[str, list[dict[str, float]]] = {}


def mark(name: str, at: float | None = None) -> None:
    if MARKS[0] is not None:
        MARKS[0][name] = time.perf_counter() if at is None else at


def took(started: float) -> None:
    if MEASURING[0] is not None:
        ROUND_TRIPS.setdefault(MEASURING[0], []).append(time.perf_counter() - started)
    mark("call", started)
    mark("called")


def timing_warden_clients() -> None:
    """Times every check made through warden's clients (into ROUND_TRIPS)."""
    from warden_client import AsyncWardenClient, WardenClient

    check, acheck = WardenClient.check, AsyncWardenClient.check

    def timed(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return check(self, *args, **kwargs)
        finally:
            took(started)

    async def atimed(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return await acheck(self, *args, **kwargs)
        finally:
            took(started)

    WardenClient.check, AsyncWardenClient.check = timed, atimed


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
        started = time.perf_counter()
        count, _, fresh = recipe_pipeline(REDIS, *verdict).execute()
        took(started)
        return recipe_answer(count, fresh) or self.get_response(request)


class AsyncOnlyMiddleware:
    """A middleware Django may only await (under ASGI, as it is)."""

    sync_capable = False
    async_capable = True

    def __init__(self, get_response):
        from asgiref.sync import markcoroutinefunction

        self.get_response = get_response
        markcoroutinefunction(self)


class AsyncRedisRecipeMiddleware(AsyncOnlyMiddleware):
    """The recipe as an async Django team writes it: redis.asyncio."""

    async def __call__(self, request):
        if not request.path.startswith("/ar/"):
            return await self.get_response(request)
        verdict = recipe_verdict(request)
        if not isinstance(verdict, tuple):
            return verdict
        started = time.perf_counter()
        count, _, fresh = await recipe_pipeline(ASYNC_REDIS, *verdict).execute()
        took(started)
        return recipe_answer(count, fresh) or await self.get_response(request)


class PhaseMiddleware(AsyncOnlyMiddleware):
    """Outermost under ASGI with --phases: marks when the middleware stack
    is entered and left."""

    async def __call__(self, request):
        mark("in")
        response = await self.get_response(request)
        mark("out")
        return response


# The marks of an ASGI request in the order they are made, and the name of
# the phase between each two that can follow one another (a variant with
# no call goes from the middleware's start to the view in one).
MARK_ORDER = ["start", "in", "call", "called", "view", "out", "end"]
PHASE_NAMES = {
    ("start", "in"): "Django, before the middleware",
    ("in", "call"): "middleware, before its call",
    ("call", "called"): "the call",
    ("called", "view"): "from the call to the view",
    ("in", "view"): "from the middleware to the view (no call)",
    ("view", "out"): "the view, and back out of the middleware",
    ("out", "end"): "Django, after the middleware",
}
WHOLE = "the whole request"


def phase_medians(records: list[dict[str, float]]) -> dict[str, float]:
    """Median µs of each phase, between each two marks made one after the
    other, among the phases every record has."""
    spans: dict[str, list[float]] = {}
    for r in records:
        made = [m for m in MARK_ORDER if m in r]
        for a, b in zip(made, made[1:]):
            spans.setdefault(PHASE_NAMES[a, b], []).append(r[b] - r[a])
        spans.setdefault(WHOLE, []).append(r["end"] - r["start"])
    return {name: statistics.median(times) * 1e6 for name, times in spans.items() if len(times) == len(records)}


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

    out["AsyncWardenClient.check, compiled transport"] = asyncio.run(async_warden(None))
    out["the same, busy_wait_us=0 (handed to the transport's thread)"] = asyncio.run(async_warden(0))
    out["Redis recipe's pipeline, redis.asyncio"] = asyncio.run(async_redis())
    return out


WARM_UP = 100


def rotations(variants: list[str], rounds: int):
    """Each variant once a round, the order turned by one each round: a
    slow minute of the VM (the bare view's own time swings by 20 % between
    minutes) falls on every variant alike, and none always follows the same
    one."""
    for r in range(rounds):
        turn = r % len(variants)
        yield from variants[turn:] + variants[:turn]


def summary(rounds: dict[str, list[tuple[float, float]]]) -> dict[str, dict]:
    """Per variant: median µs and CPU µs per request over the rounds, and
    its overhead over the baseline *of the same round*: median, low, high."""

    base = [us for us, _ in rounds["baseline"]]
    out = {}
    for variant, runs in rounds.items():
        entry = {"us": statistics.median(us for us, _ in runs), "cpu_us": statistics.median(c for _, c in runs),
                 "rounds_us": [round(us, 1) for us, _ in runs]}
        if variant != "baseline":
            overheads = [us - b for (us, _), b in zip(runs, base)]
            entry.update(overhead_us=statistics.median(overheads), overhead_low_us=min(overheads),
                         overhead_high_us=max(overheads))
        out[variant] = entry
    return out


def ahead(rounds: dict[str, list[tuple[float, float]]], ours: str, theirs: str) -> tuple[int, int]:
    """In how many rounds `ours` took less time than `theirs`, of how many."""
    pairs = list(zip(rounds[ours], rounds[theirs]))
    return sum(a < b for (a, _), (b, _) in pairs), len(pairs)


def print_table(summary: dict[str, dict], names: dict[str, str]) -> None:
    print("| variant | µs per request | overhead µs (low–high of the rounds) | Django process CPU µs per request |")
    print("|---|---|---|---|")
    for variant, s in summary.items():
        overhead = ("–" if variant == "baseline" else
                    f"{s['overhead_us']:.0f} ({s['overhead_low_us']:.0f}–{s['overhead_high_us']:.0f})")
        print(f"| {names[variant]} | {s['us']:.0f} | {overhead} | {s['cpu_us']:.0f} |")


def start(args, out_path):
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    while True:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"{args[0]} did not start")
        if line.startswith("listening on "):
            return proc, line.split()[2]


def install_the_release_transport() -> None:
    """Builds the compiled transport with --release into this Python's
    environment, as `pip install` builds it. `tests/run` installs a debug
    build, several times slower per call; timed by mistake, it would make
    warden look slower than it is. Without maturin, whatever is installed
    is used, and a debug build is refused."""
    maturin = Path(sys.executable).parent / "maturin"
    if maturin.exists():
        print("building the compiled transport (--release)", file=sys.stderr)
        subprocess.run([str(maturin), "develop", "--release", "--quiet", "--locked",
                        "-m", str(REPO / "client/python-native/Cargo.toml")],
                       cwd=REPO, check=True, env={**os.environ, "VIRTUAL_ENV": sys.prefix})
    try:
        import warden_client_native
    except ImportError:
        return  # reported where the transports are chosen
    if getattr(warden_client_native, "BUILD_PROFILE", None) != "release":
        sys.exit("the installed warden-client-native is not a release build: "
                 "pip install ./client/python-native (or maturin develop --release)")


def main() -> None:
    global REDIS
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--redis-port", type=int, default=6398)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--in-flight", type=int, default=1,
                        help="requests in flight at once under ASGI (gathered in groups of this many)")
    parser.add_argument("--rounds", type=int, default=10,
                        help="rounds the requests are split into, every variant once a round")
    parser.add_argument("--phases", action="store_true",
                        help="also split each ASGI request into phases (one at a time only)")
    args = parser.parse_args()
    if args.phases and args.in_flight != 1:
        parser.error("--phases times one request at a time: leave --in-flight at 1")

    import redis
    import redis.asyncio

    subprocess.run(["cargo", "build", "-q", "--release", "-p", "warden-server", "-p", "warden-benches"],
                   cwd=REPO, check=True)
    # Which kind of day the host has: the same numbers can differ twofold.
    subprocess.run([str(REPO / "target/release/warden-bench"), "host"], check=True,
                   stdout=sys.stderr if args.json else None)
    install_the_release_transport()
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
        timing_warden_clients()
        from django.test import AsyncClient, Client

        from warden_client.client import native_transport_available
        from warden_client.django.conf import get_conf
        from warden_client.signing import sign_request

        body = b'{"qty": 1}' * 10
        base_warden = dict(settings.WARDEN)
        transports = ["native", "grpcio"]
        if not native_transport_available():
            print("warden-client-native is not installed: the compiled transport is not measured", file=sys.stderr)
            transports.remove("native")
        per_round = max(args.in_flight, (args.requests - WARM_UP) // args.rounds // args.in_flight * args.in_flight)

        def signed(prefix: str, n: int) -> list[dict[str, str]]:
            """Signed just before they are sent, so none grows stale."""
            return [sign_request(key["key_id"], key["secret"], "POST", f"/{prefix}/orders", "", body) for _ in range(n)]

        def use(warden: dict) -> None:
            # A new object, so that the middleware parses it again (once,
            # here, not in the timed requests); clients are kept per setting.
            settings.WARDEN = {**base_warden, **warden}
            get_conf()

        # Sync: Django's test client, one request at a time.
        sync_variants = {"baseline": ("b", {})}
        for transport in transports:
            sync_variants[f"warden_{transport}"] = ("w", {"TRANSPORT": transport})
        sync_variants["redis_recipe"] = ("r", {})
        client = Client()

        def sync_batch(variant: str, n: int) -> tuple[float, float]:
            prefix, warden = sync_variants[variant]
            use(warden)
            reqs = [{f"HTTP_{k.upper().replace('-', '_')}": v for k, v in h.items()} for h in signed(prefix, n)]
            times, cpu = [], time.process_time()
            for h in reqs:
                started = time.perf_counter()
                r = client.post(f"/{prefix}/orders", data=body, content_type="application/json", **h)
                times.append(time.perf_counter() - started)
                assert r.status_code == 200, (prefix, r.status_code, r.content)
            return statistics.median(times) * 1e6, (time.process_time() - cpu) / n * 1e6

        for variant in sync_variants:  # warm up (connections, imports)
            sync_batch(variant, WARM_UP)
        sync = {variant: [] for variant in sync_variants}
        for variant in rotations(list(sync_variants), args.rounds):
            MEASURING[0] = variant
            sync[variant].append(sync_batch(variant, per_round))
            MEASURING[0] = None

        # Under ASGI: Django's async test client, an async view, each
        # variant's middleware alone (a client's handler loads MIDDLEWARE at
        # its first request), all on one event loop.
        import asyncio

        warden_mw = "warden_client.django.WardenMiddleware"
        asgi_variants = {"baseline": ("ab", [], {})}
        for transport in transports:
            asgi_variants[f"warden_async_{transport}"] = ("aw", [warden_mw], {"TRANSPORT": transport})
            if transport == "native":
                # Every check handed to the transport's thread at once, as
                # every async check was before session 31.
                asgi_variants["warden_async_native_handed"] = (
                    "aw", [warden_mw], {"TRANSPORT": "native", "BUSY_WAIT_US": 0})
                # Like for like with the recipe, which tells its clients
                # nothing of their limits.
                asgi_variants["warden_async_native_quiet"] = (
                    "aw", [warden_mw], {"TRANSPORT": "native", "RATELIMIT_HEADERS": False})
        asgi_variants["warden_sync_only"] = (
            "aw", [f"{__name__}.SyncOnlyWardenMiddleware"], {"TRANSPORT": transports[0]})
        asgi_variants["redis_recipe_async"] = ("ar", [f"{__name__}.AsyncRedisRecipeMiddleware"], {})
        if args.phases:
            for variant, (prefix, middleware, conf) in asgi_variants.items():
                asgi_variants[variant] = (prefix, [f"{__name__}.PhaseMiddleware", *middleware], conf)

        async def asgi_rounds() -> dict[str, list[tuple[float, float]]]:
            global ASYNC_REDIS
            # redis.asyncio's connections belong to the loop that made them.
            ASYNC_REDIS = redis.asyncio.Redis(host="127.0.0.1", port=args.redis_port)
            clients = {}

            async def batch(variant: str, n: int) -> tuple[float, float]:
                prefix, _, warden = asgi_variants[variant]
                use(warden)
                aclient = clients[variant]

                times = []

                async def one(h):
                    measured = args.phases and MEASURING[0] is not None
                    MARKS[0] = {} if measured else None
                    started = time.perf_counter()
                    mark("start", started)
                    r = await aclient.post(f"/{prefix}/orders", data=body, content_type="application/json", headers=h)
                    times.append(time.perf_counter() - started)
                    mark("end")
                    if measured:
                        PHASES.setdefault(variant, []).append(MARKS[0])
                    MARKS[0] = None
                    assert r.status_code == 200, (prefix, r.status_code, r.content)

                reqs = signed(prefix, n)
                started, cpu = time.perf_counter(), time.process_time()
                for i in range(0, n, args.in_flight):
                    await asyncio.gather(*[one(h) for h in reqs[i:i + args.in_flight]])
                # One at a time, the median request; in flight, the time per
                # request of the whole (requests overlap).
                us = statistics.median(times) * 1e6 if args.in_flight == 1 else (time.perf_counter() - started) / n * 1e6
                return us, (time.process_time() - cpu) / n * 1e6

            for variant, (_, middleware, _) in asgi_variants.items():
                settings.MIDDLEWARE = middleware
                clients[variant] = AsyncClient()
                await batch(variant, WARM_UP)  # loads this variant's middleware; warms it up
            out = {variant: [] for variant in asgi_variants}
            for variant in rotations(list(asgi_variants), args.rounds):
                MEASURING[0] = variant
                out[variant].append(await batch(variant, per_round))
                MEASURING[0] = None
            await ASYNC_REDIS.aclose()
            return out

        asgi = asyncio.run(asgi_rounds())
        lone = lone_calls(args, addr, dev, key, body) if "native" in transports else {}

        result = {
            "requests": args.requests,
            "rounds": args.rounds,
            "per_round": per_round,
            "asgi_in_flight": args.in_flight,
            "sync": summary(sync),
            "asgi": summary(asgi),
            "sync_warden_ahead_rounds": ahead(sync, "warden_native" if "native" in transports else "warden_grpcio",
                                              "redis_recipe"),
            "asgi_warden_ahead_rounds": ahead(asgi, f"warden_async_{transports[0]}", "redis_recipe_async"),
            "lone_calls_median_us": lone,
            "round_trip_median_us": {variant: statistics.median(times) * 1e6
                                     for variant, times in ROUND_TRIPS.items()},
        }
        if args.phases:
            result["asgi_phases_median_us"] = {variant: phase_medians(records)
                                               for variant, records in PHASES.items()}
        if args.json:
            print(json.dumps(result))
        else:
            names = {
                "baseline": "no check (baseline)",
                "warden_native": "warden middleware (one Check over mTLS, compiled transport (warden-client-native))",
                "warden_grpcio": "warden middleware (one Check over mTLS, grpcio)",
                "redis_recipe": "Redis recipe (HMAC in Python + pipelined INCR/EXPIRE/SET NX)",
                "warden_async_native": "warden middleware, async, compiled transport",
                "warden_async_native_handed": "the same, BUSY_WAIT_US = 0 (every check handed to the transport's thread)",
                "warden_async_native_quiet": "the same, RATELIMIT_HEADERS = False (no RateLimit headers, as the recipe)",
                "warden_async_grpcio": "warden middleware, async, grpc.aio",
                "warden_sync_only": f"warden middleware made sync-only ({transports[0]}; Django runs it on a thread)",
                "redis_recipe_async": "Redis recipe, async (redis.asyncio)",
            }
            print(f"{args.rounds} rounds of {per_round} requests per variant, the variants in a different order "
                  "each round. A round's µs per request: its median request (under ASGI with requests in flight, "
                  "its time over its requests). Medians over the rounds, and the range of a round's overhead.")
            print()
            print_table(result["sync"], names)
            won, of = result["sync_warden_ahead_rounds"]
            print(f"\nwarden's middleware cost less than the recipe in {won} of {of} rounds.")
            print()
            print(f"Under ASGI (Django's async test client, async view), {args.in_flight} in flight:")
            print()
            print_table(result["asgi"], names)
            won, of = result["asgi_warden_ahead_rounds"]
            print(f"\nwarden's async middleware cost less than the async recipe in {won} of {of} rounds.")
            print()
            print("The check's own round trip inside Django (median µs, every measured request): warden's client")
            print("call (request built, sent, answered, read into a Decision), the recipe's pipeline (sent, answered):")
            print()
            print("| variant | round trip µs |")
            print("|---|---|")
            for variant, us in result["round_trip_median_us"].items():
                print(f"| {names[variant]} | {us:.0f} |")
            if args.phases:
                print()
                print("Where an ASGI request's time went (median µs of each phase; '–' where a variant has no")
                print("call). The recipe resolves the URL after its call, warden's middleware before it:")
                print()
                phases = result["asgi_phases_median_us"]
                spans = [name for name in [*PHASE_NAMES.values(), WHOLE] if any(name in p for p in phases.values())]
                print("| variant | " + " | ".join(spans) + " |")
                print("|---" * (len(spans) + 1) + "|")
                for variant, p in phases.items():
                    cells = [f"{p[name]:.0f}" if name in p else "–" for name in spans]
                    print(f"| {names[variant]} | " + " | ".join(cells) + " |")
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
