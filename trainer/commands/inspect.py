"""``dmd2 inspect MODEL``: load a checkpoint the way training would and print what the loader found."""
from __future__ import annotations

import json
import os


def add_arguments(parser) -> None:
    parser.add_argument("model", metavar="MODEL", help="SDXL .safetensors checkpoint, diffusers folder or Hub repo id")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                        help="override the prediction type the model declares (a v_pred key, or its scheduler config)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow .ckpt/.pt/.bin pickle files (read with torch.load(weights_only=True))")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")


def _quiet_libraries() -> None:
    """Library progress bars and advisories would drown the report (and the one-line errors) on stderr.

    Set through the environment, before the libraries are imported (they are imported lazily, after refusals).
    """
    for var, value in (("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("HF_HUB_VERBOSITY", "error")):
        os.environ.setdefault(var, value)


def format_report(info: dict) -> str:
    comps = info["components"]
    labels = {"unet": "unet", "text_encoder": "text_encoder (CLIP-L)", "text_encoder_2": "text_encoder_2 (CLIP-G)", "vae": "vae"}
    missing = [labels[c] for c, ok in comps.items() if not ok]
    pred = info["prediction_type"] + (" + zero-terminal SNR" if info["zero_terminal_snr"] else "")
    keys = ", ".join(f"{c} {n}" for c, n in info["key_counts"].items() if n is not None)
    if info.get("other_keys"):
        keys += f" (+{info['other_keys']} other)"
    arch = info.get("architecture", {})
    rows = [
        ("model", f"{info['name']} ({info['source']})"),
        ("family", f"{info['family']} (variant: {info['variant']})"),
        ("format", info["format"]),
        ("prediction", f"{pred} (from: {info['prediction_type_origin']})"),
        ("components", ", ".join(labels[c] for c, ok in comps.items() if ok) + (f"; missing: {', '.join(missing)}" if missing else "")),
        ("keys", keys),
        ("dtype", str(info["dtype"])),
    ]
    if info.get("markers"):
        rows.append(("markers", ", ".join(info["markers"])))
    rows += [(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in arch.items()]
    rows.append(("sha256", info["content_hash"]))
    width = max(len(k) for k, _ in rows) + 1
    return "\n".join(f"{k + ':':<{width}} {v}" for k, v in rows)


def run(args) -> int:
    _quiet_libraries()
    from trainer.models.detect import check_source

    check_source(args.model, allow_pickle=args.allow_pickle)  # refusals before torch/diffusers are imported
    from trainer.models.loading import load_sdxl

    model = load_sdxl(args.model, prediction_type=args.prediction_type, allow_pickle=args.allow_pickle)
    print(json.dumps(model.info, indent=2) if args.json else format_report(model.info))
    return 0
