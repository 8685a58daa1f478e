"""What an experiment is and what ran in it, in words the logs, `pawpular status`, `runs` and the report share.

    recipe.kind(cfg)            "frozen" (no model is fine-tuned), "fine-tuned", or "fine-tuned + frozen"
    recipe.describe(cfg)        one line: the recipe, the frozen backbones, the fine-tuned model when it trains
    recipe.sets(out, features)  each embedding set that ran: backbone, image size, feature kind, reuse (manifests)
    recipe.trained_model(out, config)  the fine-tuned model's settings, only when this experiment trained one
    recipe.what_ran(out, config)       all three for a finished experiment folder (runs, the report)

A run is *frozen* when nothing it needs trains (``stages.needed``): its SVR reads only frozen backbones
(``embed.backbones``, or the deprecated ``embed.source: pretrained``) and no NN head is blended.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import heads as svr_heads
from .store import artifacts, manifest

FROZEN, FINE_TUNED, BOTH = "frozen", "fine-tuned", "fine-tuned + frozen"
DEFAULT_KIND = "pooled"  # the feature kind embed writes when a set's manifest names none


def kind(cfg: Any) -> str:
    from .stages import needed

    trains = "train" in needed(cfg)
    frozen = bool(cfg.embed.backbones) or cfg.embed.source == "pretrained"
    return (BOTH if frozen else FINE_TUNED) if trains else FROZEN


def describe(cfg: Any) -> str:
    """E.g. "frozen: the SVR on resnet, convnext (embed.backbones); nothing is fine-tuned"."""
    names = [b["name"] for b in cfg.embed.backbones if isinstance(b, dict) and "name" in b]
    if cfg.embed.source == "pretrained":
        names.append(f"{artifacts.MODEL_SET} (the frozen {cfg.model.name}, embed.source: pretrained)")
    used = [
        n
        for head, s in svr_heads.heads(cfg).items()
        if head in cfg.ensemble.heads
        for n in s.features
        if n != artifacts.MODEL_SET
    ]
    used = list(dict.fromkeys(used))
    k = kind(cfg)
    frozen = f"frozen backbones {', '.join(used or names)}" if (used or names) else ""
    if k == FROZEN:
        return f"frozen: {frozen or 'frozen backbones'} feed the SVR head; nothing is fine-tuned"
    model = f"{cfg.model.name} fine-tuned ({cfg.model.finetune}, {cfg.train.epochs} epochs)"
    return f"{k}: {model}" + (f"; {frozen}" if frozen and k == BOTH else "")


def _record_sets(out: Path) -> dict[str, manifest.Record]:
    units = manifest.unit_records(out)
    prefix = artifacts.STAGE_DIRS["embed"] + "/"
    return {u.removeprefix(prefix): r for u, r in units.items() if u.startswith(prefix)}


def _links(path: Path) -> int:
    try:
        return os.stat(path).st_nlink
    except OSError:
        return 0


def sets(out: Path, features: list[str] | None = None) -> list[dict]:
    """Each embedding set the experiment holds (``features``: only those, in that order; the fold sets as one
    "model"): name, backbone, image size, feature kind, frozen or fine-tuned, and whether it came from another
    experiment through the shared cache (``embedding_cache``) and how many others hold the same files."""
    out = Path(out)
    records = _record_sets(out)
    grouped: dict[str, tuple[str, manifest.Record]] = {}
    for folder, record in records.items():
        name = artifacts.MODEL_SET if artifacts.parse_fold(folder) is not None else folder
        grouped.setdefault(name, (folder, record))
    names = [n for n in (features or grouped) if n in grouped]
    found = []
    for name in names:
        folder, record = grouped[name]
        transform = (record.config.get("derived") or {}).get("transform") or {}
        size = transform.get("input_size")
        cached = bool(record.info.get("cache"))
        found.append(
            {
                "name": name,
                "backbone": record.info.get("backbone"),
                "img_size": size[-1] if size else None,
                "kind": record.info.get("output") or (record.config.get("embed") or {}).get("output") or DEFAULT_KIND,
                "source": record.info.get("source"),
                "reused": cached and bool(record.info.get("reused")),
                "shared_with": max(0, _links(out / "emb" / folder / "train.parquet") - 2) if cached else 0,
            }
        )
    return found


def set_label(s: dict) -> str:
    """ "resnet=resnet18@96 pooled" (the backbone and size where the manifest records them)."""
    what = " ".join(x for x in (f"{s['backbone']}@{s['img_size']}" if s["backbone"] else "", s["kind"]) if x)
    return f"{s['name']}={what}" + (" (reused)" if s["reused"] else "")


def trained_model(out: Path, config: dict) -> dict | None:
    """The fine-tuned model's settings (name, image size, mode, epochs), when this experiment trained folds."""
    if not any(
        (d / "manifest.json").is_file() for d in artifacts.fold_dirs(artifacts.stage_dir(out, "train")).values()
    ):
        return None
    model, train = config.get("model") or {}, config.get("train") or {}
    return {
        "model": model.get("name"),
        "img_size": model.get("img_size"),
        "finetune": model.get("finetune"),
        "epochs": train.get("epochs"),
    }


def reuse_line(out: Path, features: list[str] | None = None) -> str:
    """For `pawpular status`: the sets that came from another experiment through the shared cache
    (``embedding_cache``), and how many other experiments hold the same files; "" when none is shared."""
    found = [s for s in sets(out, features) if s["reused"] or s["shared_with"]]
    if not found:
        return ""
    reused = [s["name"] for s in found if s["reused"]]
    shared = max(s["shared_with"] for s in found)
    return ", ".join(
        x
        for x in (
            f"reused from the shared cache: {', '.join(reused)}" if reused else "",
            f"sets shared with {shared} other experiment(s)" if shared else "",
        )
        if x
    )


def what_ran(out: Path, config: dict) -> dict:
    """{"recipe": frozen | fine-tuned | fine-tuned + frozen, "model": ``trained_model`` or None, "sets": ``sets``
    of svr.features}: what an experiment folder holds, from its manifests and config.yaml."""
    trained = trained_model(out, config)
    svr = config.get("svr") or {}
    features = svr.get("features")
    for head in svr.get("heads") or []:  # svr.heads' sets too
        features = [*(features or []), *((head.get("features") or []) if isinstance(head, dict) else [])]
    found = sets(out, list(dict.fromkeys(features)) if features is not None else None)
    frozen = any(s["source"] == "frozen" for s in found)
    return {"recipe": FROZEN if not trained else BOTH if frozen else FINE_TUNED, "model": trained, "sets": found}
