"""Writes the comfy-dmd2 example workflows, each graph defined once and emitted in both ComfyUI formats:

  workflows/ui/<name>.json    UI (LiteGraph) format: open or drag into ComfyUI
  workflows/api/<name>.json   API format: POST {"prompt": ...} to /prompt
  example_workflows/<name>.json  the UI files again, which ComfyUI lists as this pack's templates

``python workflows/make_workflows.py`` rewrites them; the tests check the files are up to date and that every node,
widget order and link matches a running ComfyUI's /object_info.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTROL = "control_after_generate"  # the frontend's extra widget value after a seed ("fixed", "randomize", ...)

# type -> (socket inputs [(name, type)], widget names in /object_info order, outputs [(name, type)])
SPECS: dict[str, tuple[list, list, list]] = {
    "CheckpointLoaderSimple": ([], ["ckpt_name"], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CLIPTextEncode": ([("clip", "CLIP")], ["text"], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([], ["width", "height", "batch_size"], [("LATENT", "LATENT")]),
    "LoadImage": ([], ["image", "upload"], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "VAEEncode": ([("pixels", "IMAGE"), ("vae", "VAE")], [], [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], ["filename_prefix"], []),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")],
                 ["seed", CONTROL, "steps", "cfg", "sampler_name", "scheduler", "denoise"], [("LATENT", "LATENT")]),
    "RandomNoise": ([], ["noise_seed", CONTROL], [("NOISE", "NOISE")]),
    "BasicGuider": ([("model", "MODEL"), ("conditioning", "CONDITIONING")], [], [("GUIDER", "GUIDER")]),
    "SamplerCustomAdvanced": ([("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"), ("sigmas", "SIGMAS"),
                               ("latent_image", "LATENT")], [], [("output", "LATENT"), ("denoised_output", "LATENT")]),
    "DMD2LoraLoader": ([("model", "MODEL")], ["lora_name", "strength"],
                       [("MODEL", "MODEL"), ("recipe", "STRING"), ("report", "STRING")]),
    "DMD2Scheduler": ([("model", "MODEL")], ["preset", "custom_timesteps", "denoise"], [("SIGMAS", "SIGMAS")]),
    "DMD2Sampler": ([], ["start"], [("SAMPLER", "SAMPLER")]),
    "DMD2KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("latent_image", "LATENT")],
                     ["seed", CONTROL, "preset", "denoise"], [("LATENT", "LATENT")]),
}
# /object_info display names: the frontend's default titles, and the API format's _meta titles
DISPLAY = {
    "CheckpointLoaderSimple": "Load Checkpoint", "CLIPTextEncode": "CLIP Text Encode (Prompt)",
    "EmptyLatentImage": "Empty Latent Image", "LoadImage": "Load Image", "VAEEncode": "VAE Encode",
    "VAEDecode": "VAE Decode", "SaveImage": "Save Image", "KSampler": "KSampler", "RandomNoise": "RandomNoise",
    "BasicGuider": "BasicGuider", "SamplerCustomAdvanced": "SamplerCustomAdvanced",
    "DMD2LoraLoader": "DMD2 LoRA Loader", "DMD2Scheduler": "DMD2 Scheduler", "DMD2Sampler": "DMD2 Sampler",
    "DMD2KSampler": "DMD2 KSampler",
}
UI_ONLY_WIDGETS = {CONTROL, "upload"}  # frontend widgets that are not inputs of the API format

CHECKPOINT = "sd_xl_base_1.0.safetensors"
LORA_4STEP = "dmd2_4step_lora.safetensors"
LORA_1STEP = "dmd2_1step_lora.safetensors"
PROMPT = "a photo of a red fox in a snowy forest, golden hour, highly detailed"


class Graph:
    def __init__(self):
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, type_: str, pos, title: str | None = None, size=(320, 120), **widgets) -> int:
        sockets, names, outputs = SPECS[type_]
        values = []
        for name in names:
            if name == CONTROL:
                values.append(widgets.pop(CONTROL, "fixed"))
            elif name == "upload":
                values.append("image")
            else:
                values.append(widgets.pop(name))
        if widgets:
            raise KeyError(f"{type_}: unknown widgets {sorted(widgets)}")
        node = {
            "id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": list(size), "flags": {}, "order": 0,
            "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in sockets],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": type_},
            "widgets_values": values,
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node["id"]

    def link(self, src: int, slot: int, dst: int, input_name: str) -> None:
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        target = next(i for i, x in enumerate(d["inputs"]) if x["name"] == input_name)
        kind = s["outputs"][slot]["type"]
        if d["inputs"][target]["type"] != kind:
            raise TypeError(f"{s['type']}[{slot}] {kind} -> {d['type']}.{input_name} {d['inputs'][target]['type']}")
        link_id = len(self.links) + 1
        self.links.append([link_id, src, slot, dst, target, kind])
        s["outputs"][slot]["links"].append(link_id)
        d["inputs"][target]["link"] = link_id

    def _order(self) -> None:
        deps = {n["id"]: {l[1] for l in self.links if l[3] == n["id"]} for n in self.nodes}
        done: list[int] = []
        while len(done) < len(self.nodes):
            ready = [i for i in sorted(deps) if i not in done and deps[i] <= set(done)]
            if not ready:
                raise ValueError("cycle in graph")
            done.extend(ready)
        for order, node_id in enumerate(done):
            self.nodes[node_id - 1]["order"] = order

    def ui(self) -> dict:
        self._order()
        return {
            "last_node_id": len(self.nodes), "last_link_id": len(self.links),
            "nodes": self.nodes, "links": self.links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4,
        }

    def api(self) -> dict:
        out = {}
        for n in self.nodes:
            inputs = {}
            names = [w for w in SPECS[n["type"]][1]]
            for name, value in zip(names, n["widgets_values"]):
                if name not in UI_ONLY_WIDGETS:
                    inputs[name] = value
            for x in n["inputs"]:
                if x["link"] is not None:
                    link = self.links[x["link"] - 1]
                    inputs[x["name"]] = [str(link[1]), link[2]]
            out[str(n["id"])] = {"inputs": inputs, "class_type": n["type"], "_meta": {"title": n.get("title", DISPLAY[n["type"]])}}
        return out


def _loader_and_prompt(g: Graph, lora: str, strength: float = 1.0):
    ckpt = g.add("CheckpointLoaderSimple", (0, 0), ckpt_name=CHECKPOINT, size=(320, 100))
    lora_node = g.add("DMD2LoraLoader", (0, 160), lora_name=lora, strength=strength, size=(320, 110))
    g.link(ckpt, 0, lora_node, "model")
    pos = g.add("CLIPTextEncode", (360, 0), title="Prompt (no negative: DMD2 samples at cfg 1)", text=PROMPT, size=(400, 160))
    g.link(ckpt, 1, pos, "clip")
    return ckpt, lora_node, pos


def _decode_save(g: Graph, ckpt: int, latent_src: tuple[int, int], x: int, prefix: str, y: int = 0):
    dec = g.add("VAEDecode", (x, y), size=(200, 50))
    g.link(latent_src[0], latent_src[1], dec, "samples")
    g.link(ckpt, 2, dec, "vae")
    save = g.add("SaveImage", (x + 230, y), filename_prefix=prefix, size=(400, 440))
    g.link(dec, 0, save, "images")


def txt2img_4step() -> Graph:
    """4 steps at the trained timesteps 999/749/499/249, all in one node; the recipe comes from the LoRA file."""
    g = Graph()
    ckpt, lora, pos = _loader_and_prompt(g, LORA_4STEP)
    latent = g.add("EmptyLatentImage", (360, 220), width=1024, height=1024, batch_size=1, size=(320, 110))
    ks = g.add("DMD2KSampler", (800, 0), seed=0, preset="from LoRA", denoise=1.0, size=(320, 170))
    g.link(lora, 0, ks, "model")
    g.link(pos, 0, ks, "positive")
    g.link(latent, 0, ks, "latent_image")
    _decode_save(g, ckpt, (ks, 0), 1150, "dmd2_4step")
    return g


def txt2img_1step() -> Graph:
    """1 step at t=399 with the modular nodes: DMD2 Scheduler + DMD2 Sampler in SamplerCustomAdvanced."""
    g = Graph()
    ckpt, lora, pos = _loader_and_prompt(g, LORA_1STEP)
    latent = g.add("EmptyLatentImage", (360, 220), width=1024, height=1024, batch_size=1, size=(320, 110))
    sched = g.add("DMD2Scheduler", (360, 380), preset="1 step", custom_timesteps="399", denoise=1.0, size=(320, 130))
    g.link(lora, 0, sched, "model")
    sampler = g.add("DMD2Sampler", (360, 550), start="auto", size=(320, 60))
    noise = g.add("RandomNoise", (800, 0), noise_seed=0, size=(320, 82))
    guider = g.add("BasicGuider", (800, 130), size=(240, 50))
    g.link(lora, 0, guider, "model")
    g.link(pos, 0, guider, "conditioning")
    adv = g.add("SamplerCustomAdvanced", (800, 230), size=(270, 330))
    g.link(noise, 0, adv, "noise")
    g.link(guider, 0, adv, "guider")
    g.link(sampler, 0, adv, "sampler")
    g.link(sched, 0, adv, "sigmas")
    g.link(latent, 0, adv, "latent_image")
    _decode_save(g, ckpt, (adv, 0), 1150, "dmd2_1step")
    return g


def img2img() -> Graph:
    """img2img: the input image's latent re-noised to t=499, then steps 499 and 249 of the 4-step student."""
    g = Graph()
    ckpt, lora, pos = _loader_and_prompt(g, LORA_4STEP)
    image = g.add("LoadImage", (0, 320), image="example.png", size=(320, 320))
    enc = g.add("VAEEncode", (360, 220), size=(200, 50))
    g.link(image, 0, enc, "pixels")
    g.link(ckpt, 2, enc, "vae")
    ks = g.add("DMD2KSampler", (800, 0), seed=0, preset="from LoRA", denoise=0.5, size=(320, 170))
    g.link(lora, 0, ks, "model")
    g.link(pos, 0, ks, "positive")
    g.link(enc, 0, ks, "latent_image")
    _decode_save(g, ckpt, (ks, 0), 1150, "dmd2_img2img")
    return g


def teacher_vs_student() -> Graph:
    """The same prompt and seed: the teacher (25 Euler steps, cfg 6, with a negative prompt) beside the 4-step student."""
    g = Graph()
    ckpt, lora, pos = _loader_and_prompt(g, LORA_4STEP)
    neg = g.add("CLIPTextEncode", (360, 200), title="Negative (teacher only)", text="blurry, low quality", size=(400, 100))
    g.link(ckpt, 1, neg, "clip")
    latent = g.add("EmptyLatentImage", (360, 340), width=1024, height=1024, batch_size=1, size=(320, 110))
    teacher = g.add("KSampler", (800, 0), title="Teacher: 25 steps, cfg 6", seed=0, steps=25, cfg=6.0,
                    sampler_name="euler", scheduler="normal", denoise=1.0, size=(320, 262))
    g.link(ckpt, 0, teacher, "model")
    g.link(pos, 0, teacher, "positive")
    g.link(neg, 0, teacher, "negative")
    g.link(latent, 0, teacher, "latent_image")
    student = g.add("DMD2KSampler", (800, 320), title="Student: 4 steps, cfg 1", seed=0, preset="from LoRA",
                    denoise=1.0, size=(320, 170))
    g.link(lora, 0, student, "model")
    g.link(pos, 0, student, "positive")
    g.link(latent, 0, student, "latent_image")
    _decode_save(g, ckpt, (teacher, 0), 1150, "teacher", y=0)
    _decode_save(g, ckpt, (student, 0), 1150, "student", y=480)
    return g


WORKFLOWS = {
    "dmd2_4step_txt2img": txt2img_4step,
    "dmd2_1step_txt2img": txt2img_1step,
    "dmd2_img2img": img2img,
    "dmd2_teacher_vs_student": teacher_vs_student,
}


def render() -> dict[Path, str]:
    files = {}
    for name, build in WORKFLOWS.items():
        ui = json.dumps(build().ui(), indent=2) + "\n"
        files[ROOT / "workflows" / "ui" / f"{name}.json"] = ui
        files[ROOT / "example_workflows" / f"{name}.json"] = ui
        files[ROOT / "workflows" / "api" / f"{name}.json"] = json.dumps(build().api(), indent=2) + "\n"
    return files


def main() -> int:
    for path, text in render().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
