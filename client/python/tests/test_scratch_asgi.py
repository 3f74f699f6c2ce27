import asyncio, time, threading
from django.test import AsyncClient
from warden_client.signing import sign_request

def hdrs(key, method, path, query="", body=b""):
    return sign_request(key["key_id"], key["secret"], method, path, query, body)

def test_hung(warden_settings, own_warden):
    hung = own_warden
    tls = hung.tls()
    warden_settings.WARDEN = {**warden_settings.WARDEN, "TARGET": hung.addr, "FAILURE_MODE": "open",
                              "CA": tls["ca"], "CERT": tls["cert"], "KEY": tls["key"],
                              "TIMEOUT": 0.3, "BREAKER": {"FAILURES": 1000, "RESET_AFTER": 1}}
    client = AsyncClient()
    async def one():
        return await client.get("/api/orders", headers={"X-Key-Id": "k", "X-Signature": "0" * 64})
    async def many(n):
        t = time.perf_counter()
        rs = await asyncio.gather(*[one() for _ in range(n)])
        return time.perf_counter() - t, [r.status_code for r in rs]
    print("connected", asyncio.run(many(1)))
    print(threading.active_count())
    hung.pause()
    try:
        print("hung x10", asyncio.run(many(10)))
    finally:
        hung.resume()
    print(threading.active_count())

def test_rate(warden_settings, warden):
    key = warden.create_key("--owner", "x", "--policy", "demo")
    client = AsyncClient()
    async def run(n):
        t = time.perf_counter()
        for _ in range(n):
            r = await client.get("/api/orders", headers=hdrs(key, "GET", "/api/orders"))
            assert r.status_code == 200, r.content
        return (time.perf_counter() - t) / n * 1e6
    print("async seq us/req", asyncio.run(run(500)))
    async def par(n):
        t = time.perf_counter()
        rs = await asyncio.gather(*[client.get("/api/orders", headers=hdrs(key, "GET", "/api/orders")) for _ in range(n)])
        assert all(r.status_code == 200 for r in rs)
        return (time.perf_counter() - t) / n * 1e6
    print("async par us/req", asyncio.run(par(500)))
