"""Screenshot a live page (TensorBoard, the Ray dashboard) in headless Chromium through the DevTools protocol.

How docs/tensorboard.png and docs/ray-dashboard.png were taken (Debian's `chromium` package; a cookie such as
Ray's `ray-authentication-token` is set first):

    python docs/tools/screenshot.py URL OUT.png [--cookie NAME=VALUE] [--wait S] [--size 1400x900]
"""

import argparse
import asyncio
import base64
import json
import subprocess
import tempfile
import time
import urllib.request
from urllib.parse import urlsplit

import aiohttp


async def main(a):
    port = 9339
    w, h = map(int, a.size.split("x"))
    chrome = subprocess.Popen(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tempfile.mkdtemp()}",
            f"--window-size={w},{h}",
            f"--remote-debugging-port={port}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(60):
            try:
                targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2).read())
                page = next(t for t in targets if t["type"] == "page")
                break
            except Exception:
                time.sleep(0.5)
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws,
        ):
            ids = iter(range(1, 10**6))

            async def call(method, **params):
                i = next(ids)
                await ws.send_json({"id": i, "method": method, "params": params})
                async for msg in ws:
                    data = json.loads(msg.data)
                    if data.get("id") == i:
                        if "error" in data:
                            raise RuntimeError(data["error"])
                        return data["result"]

            await call("Network.enable")
            if a.cookie:
                name, value = a.cookie.split("=", 1)
                u = urlsplit(a.url)
                await call("Network.setCookie", name=name, value=value, url=f"{u.scheme}://{u.netloc}/")
            await call("Emulation.setDeviceMetricsOverride", width=w, height=h, deviceScaleFactor=1, mobile=False)
            await call("Page.navigate", url=a.url)
            await asyncio.sleep(a.wait)
            if a.js:
                print(await call("Runtime.evaluate", expression=a.js, returnByValue=True))
                await asyncio.sleep(a.after)
            shot = await call("Page.captureScreenshot", format="png")
            open(a.out, "wb").write(base64.b64decode(shot["data"]))
    finally:
        chrome.terminate()
        chrome.wait(timeout=10)


p = argparse.ArgumentParser()
p.add_argument("url")
p.add_argument("out")
p.add_argument("--cookie")
p.add_argument("--wait", type=float, default=10)
p.add_argument("--js")
p.add_argument("--after", type=float, default=3)
p.add_argument("--size", default="1400x900")
asyncio.run(main(p.parse_args()))
