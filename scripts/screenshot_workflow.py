"""Screenshot a workflow of this pack open in ComfyUI's graph editor (for the README).

Starts a headless ComfyUI (``--cpu``, loopback, a free port) with this pack loaded the way the comfy_live
tests do it (an extra_model_paths yaml whose ``custom_nodes`` is a temp dir with a symlink to the pack; the
model folders hold empty placeholder files named as in the workflow, so the editor shows no "missing models"
dialog), opens it in headless Chromium driven over the Chrome DevTools protocol, loads the workflow into the
canvas, fits the view to the graph and saves a PNG. Both processes are stopped (by pid) at the end.

Run it with ComfyUI's own python (it needs aiohttp, which ComfyUI depends on)::

    ~/.cache/dualparal-comfyui/.venv-comfy/bin/python scripts/screenshot_workflow.py \\
        --comfyui ~/.cache/dualparal-comfyui/.comfyui \\
        workflows/wan21_t2v_1.3B_long_video.json docs/img/workflow_long_video.png

Needs a Chromium (``apt-get install chromium``); ``--chromium`` names another binary.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Frontend settings written before the page opens: no templates/tutorial popup, no missing-model/node
#: dialogs, no minimap over the graph.
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Workflow.ShowMissingModelsWarning": False,
    "Comfy.Workflow.ShowMissingNodesWarning": False,
    "Comfy.Minimap.Visible": False,
    "Comfy.Validation.Workflows": False,
    "Comfy.Graph.CanvasInfo": False,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float, what: str) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read()
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer {url} in {timeout} s")


def prepare_base(base: Path, workflow: dict, name: str) -> Path:
    """custom_nodes/ with the pack, model folders with empty placeholders, the settings, the workflow saved in
    the user's workflows (so that its tab shows its name, not "Unsaved Workflow"), the yaml."""
    for d in ("custom_nodes", "out", "temp", "input", "user/default/workflows"):
        (base / d).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "DualParal").symlink_to(ROOT, target_is_directory=True)
    folders = {"diffusion_models", "text_encoders", "vae", "loras"}
    for node in workflow.get("nodes", []):
        for m in node.get("properties", {}).get("models", []) or []:
            folders.add(m["directory"])
            (base / "models" / m["directory"]).mkdir(parents=True, exist_ok=True)
            (base / "models" / m["directory"] / m["name"]).touch()
    for f in folders:
        (base / "models" / f).mkdir(parents=True, exist_ok=True)
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(SETTINGS))
    (base / "user" / "default" / "workflows" / f"{name}.json").write_text(json.dumps(workflow))
    yaml = base / "extra_model_paths.yaml"
    yaml.write_text("dualparal_screenshot:\n"
                    f"    base_path: {base}\n    custom_nodes: custom_nodes\n"
                    + "".join(f"    {f}: models/{f}\n" for f in sorted(folders)))
    return yaml


class CDP:
    """A minimal Chrome DevTools protocol client over one page target's WebSocket."""

    def __init__(self, ws):
        self.ws, self.n, self.pending, self.console = ws, 0, {}, []
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self):
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            elif data.get("method") == "Runtime.consoleAPICalled":
                args = data["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))

    async def send(self, method: str, **params):
        self.n += 1
        fut = asyncio.get_running_loop().create_future()
        self.pending[self.n] = fut
        await self.ws.send_str(json.dumps({"id": self.n, "method": method, "params": params}))
        res = await asyncio.wait_for(fut, 120)
        if "error" in res:
            raise RuntimeError(f"{method}: {res['error']}")
        return res["result"]

    async def eval(self, expr: str):
        res = await self.send("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"JS error: {res['exceptionDetails']}")
        return res["result"].get("value")

    async def wait_for(self, expr: str, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if await self.eval(expr):
                    return
            except RuntimeError:
                pass
            await asyncio.sleep(0.25)
        raise RuntimeError(f"timed out waiting for {what}")


#: Fit every node (titles included) into the canvas area left free by the top menu and the side bar.
FIT_JS = r"""
(() => {
  const app = window.app, c = app.canvas, nodes = app.graph._nodes;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of nodes) {
    const b = n.getBounding ? n.getBounding() : [n.pos[0], n.pos[1] - 30, n.size[0], n.size[1] + 30];
    x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]);
    x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]);
  }
  const el = c.canvas, W = el.clientWidth, H = el.clientHeight;
  // Free area: below the top menu bar, right of the side tool bar, above the bottom-right canvas controls.
  const top = %(top)d, left = %(left)d, pad = %(pad)d, bottom = %(bottom)d;
  const aw = W - left - 2 * pad, ah = H - top - bottom - 2 * pad;
  const s = Math.min(aw / (x1 - x0), ah / (y1 - y0), %(max_scale)f);
  c.ds.scale = s;
  c.ds.offset[0] = (left + pad + (aw - s * (x1 - x0)) / 2) / s - x0;
  c.ds.offset[1] = (top + pad + (ah - s * (y1 - y0)) / 2) / s - y0;
  c.setDirty(true, true);
  c.draw(true, true);
  return {scale: s, bounds: [x0, y0, x1, y1], W, H, n: nodes.length};
})()
"""


async def shoot(url: str, chromium: str, workflow: dict, name: str, out: Path, width: int, height: int,
                dsf: float, profile: Path) -> dict:
    import aiohttp

    proc = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--hide-scrollbars", "--mute-audio",
         f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
         f"--window-size={width},{height}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.2)
        dport = int(port_file.read_text().split()[0])
        targets = json.loads(_wait_http(f"http://127.0.0.1:{dport}/json/list", proc, 30, "chromium"))
        page = next(t for t in targets if t.get("type") == "page")
        async with aiohttp.ClientSession() as sess, \
                sess.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            cdp = CDP(ws)
            await cdp.send("Runtime.enable")
            await cdp.send("Page.enable")
            await cdp.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                           deviceScaleFactor=dsf, mobile=False)
            await cdp.send("Page.navigate", url=url)
            await cdp.wait_for("!!(window.app && window.app.graph && window.app.canvas"
                               " && window.app.canvas.ds && document.querySelector('canvas#graph-canvas'))",
                               120, "the ComfyUI app")
            await asyncio.sleep(2.0)  # let extensions finish registering and the default graph settle
            path = json.dumps(f"workflows/{name}.json")
            await cdp.wait_for(f"!!window.app.extensionManager.workflow.getWorkflowByPath({path})", 30,
                               "the saved workflow in the workflow list")
            # Opened under its saved name, the workflow's tab shows that name and no "modified" dot.
            wf, nm = json.dumps(workflow), json.dumps(name)
            await cdp.eval(f"window.app.loadGraphData({wf}, true, false, {nm})")
            n = len(workflow["nodes"])
            await cdp.wait_for(f"window.app.graph._nodes.length === {n}", 30, "the graph")
            # Close the default graph's tab, so that only the workflow's own tab is shown.
            await cdp.eval("""(async () => {
                const store = window.app.extensionManager.workflow;
                for (const w of [...store.openWorkflows])
                    if (!store.isActive(w)) await store.closeWorkflow(w);
                return true; })()""")
            # Close whatever popped up (templates, release notes, toasts).
            await cdp.eval("""(() => {
                document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape', bubbles: true}));
                for (const b of document.querySelectorAll(
                    '.p-dialog-close-button, .p-dialog-header-close, .p-toast-close-button')) b.click();
                return true; })()""")
            await asyncio.sleep(1.0)
            fit = await cdp.eval(FIT_JS % {"top": 48, "left": 56, "pad": 24, "bottom": 56, "max_scale": 1.25})
            await asyncio.sleep(1.5)
            await cdp.eval("window.app.canvas.setDirty(true, true); window.app.canvas.draw(true, true); true")
            await asyncio.sleep(0.5)
            shot = await cdp.send("Page.captureScreenshot", format="png", captureBeyondViewport=False)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(base64.b64decode(shot["data"]))
            cdp.reader.cancel()
            return fit
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workflow", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_PATH"),
                    help="ComfyUI checkout (default: $COMFYUI_PATH)")
    ap.add_argument("--python", default=sys.executable, help="python that runs ComfyUI (default: this one)")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=740)
    ap.add_argument("--scale", type=float, default=1.5, help="device scale factor of the screenshot")
    a = ap.parse_args()
    if not a.comfyui:
        ap.error("--comfyui (or $COMFYUI_PATH) is required")
    workflow = json.loads(a.workflow.read_text())
    with tempfile.TemporaryDirectory(prefix="dualparal-shot-") as tmp:
        base = Path(tmp)
        name = a.workflow.stem
        yaml = prepare_base(base, workflow, name)
        port = _free_port()
        log = open(base / "server.log", "wb")  # noqa: SIM115
        cmd = [a.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--disable-auto-launch", "--disable-api-nodes", "--extra-model-paths-config", str(yaml),
               "--output-directory", str(base / "out"), "--temp-directory", str(base / "temp"),
               "--input-directory", str(base / "input"), "--user-directory", str(base / "user"),
               "--database-url", "sqlite:///:memory:"]
        server = subprocess.Popen(cmd, cwd=a.comfyui, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_http(url + "/object_info/DualParalSampler", server, 180, "ComfyUI")
            profile = base / "chromium-profile"
            profile.mkdir()
            fit = asyncio.run(shoot(url + "/", a.chromium, workflow, name, a.out.resolve(), a.width, a.height,
                                    a.scale, profile))
            sys.stdout.write(f"saved {a.out} ({a.width}x{a.height} CSS px @ {a.scale}x, canvas zoom "
                             f"{fit['scale']:.3f}, {fit['n']} nodes)\n")
        except Exception:
            log.flush()
            sys.stderr.write((base / "server.log").read_text(errors="replace")[-4000:])
            raise
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
                    server.wait()
            log.close()


if __name__ == "__main__":
    main()
