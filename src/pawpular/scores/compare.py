"""Comparisons against the noise: `pawpular runs --baseline NAME` and, inside one experiment, each part against
what it is added to. The maths is ``nested.paired_bootstrap``; this module finds what to compare.

    rows = against(baseline_folder, folders)   # per experiment: nested RMSE minus the baseline's, 95% interval,
                                               # folds won, verdict, or "not comparable" and why
    rows = inside(folder)                      # the SVR head vs the NN head, the blend vs its best head

Every comparison is of nested predictions (``ensemble/nested.parquet``, ``train/nested.parquet``,
``svr/nested.parquet``: every choice made without the fold scored) on the same rows, resampling the duplicate
groups of the baseline's ``folds/duplicates.csv`` (a photo without a duplicate is a group alone). Two experiments
are comparable when they predict the same Ids, with the same folds and the same targets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..data.tables import ID
from ..store import artifacts, manifest
from ..store.errors import UsageError
from . import nested

BASELINE_COLUMNS = ["vs_baseline", "low", "high", "folds_won", "verdict"]


class NotComparable(Exception):
    """Why two sets of predictions cannot be compared row by row (the text `runs` shows)."""


def nested_table(out: Path, head: str = "ensemble") -> pd.DataFrame:
    """Id, fold, pred (and target for the ensemble) of a head's nested predictions; NotComparable when absent."""
    path = artifacts.nested_preds(out, head)
    if not path.is_file():
        stage = {"ensemble": "ensemble", "nn": "train", "svr": "svr"}.get(head, head)
        if manifest.read(artifacts.manifest(out, stage)) is None:
            raise NotComparable(f"not finished (its {stage} stage has not run)")
        raise NotComparable(f"no {artifacts.relative(out, path)} (run `pawpular {stage}` with this version)")
    table = pd.read_parquet(path)
    if head == "ensemble" and "target" not in table:
        raise NotComparable(f"{artifacts.relative(out, path)} has no target column (rerun `pawpular ensemble`)")
    return table


def duplicate_groups(out: Path) -> dict:
    """Id -> duplicate group from folds/duplicates.csv ({} when there is none: every row is its own group)."""
    path = artifacts.duplicates_csv(out)
    if not path.is_file():
        return {}
    table = pd.read_csv(path, dtype={ID: str})
    return dict(zip(table[ID], table["group"], strict=False))


def paired(a: pd.DataFrame, b: pd.DataFrame, groups: dict, target: pd.DataFrame | None = None) -> nested.Difference:
    """RMSE(a) - RMSE(b) of two nested tables on the same rows; NotComparable (with the reason) when the rows,
    folds or targets differ. ``target``: a table holding ``target`` for tables that lack it."""
    if len(a) != len(b) or set(a[ID]) != set(b[ID]):
        only_a, only_b = len(set(a[ID]) - set(b[ID])), len(set(b[ID]) - set(a[ID]))
        raise NotComparable(f"different rows ({len(a)} vs {len(b)}; {only_a} and {only_b} Ids not in the other)")
    m = a.merge(b, on=ID, suffixes=("_a", "_b"))
    moved = int((m["fold_a"] != m["fold_b"]).sum())
    if moved:
        raise NotComparable(f"different folds ({moved} of {len(m)} rows in another fold)")
    if target is not None:
        m = m.merge(target[[ID, "target"]], on=ID)
    elif "target_a" in m:
        if not np.allclose(m["target_a"], m["target_b"]):
            raise NotComparable("different targets for the same Ids")
        m["target"] = m["target_a"]
    codes = nested.group_codes(m[ID].tolist(), groups)
    return nested.paired_bootstrap(m["pred_a"], m["pred_b"], m["target"], codes, m["fold_a"].to_numpy())


def _rmse(table: pd.DataFrame) -> float:
    return float(np.sqrt(((table["pred"] - table["target"]) ** 2).mean()))


def against(baseline: Path, folders: list[Path], repeats: list[Path] | None = None) -> list[dict]:
    """Per folder: its nested RMSE minus the baseline's (the difference's fields) or ``why`` it is not comparable.
    ``repeats``: the baseline's config at other seeds; their largest distance from the baseline's nested RMSE (the
    seed spread) widens every verdict, and they are shown as "seed repeat"."""
    groups = duplicate_groups(baseline)
    repeats = [Path(r).resolve() for r in repeats or []]
    rows = []
    try:
        base = nested_table(baseline)
        spread = nested.seed_spread(_rmse(base), [_rmse(nested_table(r)) for r in repeats])
    except NotComparable as e:
        return [{"experiment": Path(f).name, "why": f"baseline {Path(baseline).name}: {e}"} for f in folders]
    for folder in folders:
        row = {"experiment": Path(folder).name}
        if Path(folder).resolve() == Path(baseline).resolve():
            rows.append({**row, "verdict": "baseline", "spread": spread})
            continue
        try:
            diff = paired(nested_table(folder), base, groups).with_spread(spread)
            row.update(diff.to_dict())
            if Path(folder).resolve() in repeats:
                row["verdict"] = "seed repeat"
        except NotComparable as e:
            row["why"] = str(e)
        rows.append(row)
    return rows


def inside(out: Path) -> list[dict]:
    """Inside one experiment: the SVR head against the NN head, and the blend against its best head (nested)."""
    groups, rows = duplicate_groups(out), []
    try:
        blend = nested_table(out)
    except NotComparable as e:
        return [{"experiment": out.name, "part": "blend", "why": str(e)}]
    heads = {}
    for head in [*artifacts.HEADS, *artifacts.extra_svr_heads(out)]:
        try:
            heads[head] = nested_table(out, head)
        except NotComparable:
            continue

    def part(name: str, a: pd.DataFrame, b: pd.DataFrame) -> dict:
        try:
            return {"experiment": out.name, "part": name, **paired(a, b, groups, blend).to_dict()}
        except NotComparable as e:  # e.g. a head rerun since the blend was made
            return {"experiment": out.name, "part": name, "why": str(e)}

    if "svr" in heads and "nn" in heads:
        rows.append(part("svr head vs nn head", heads["svr"], heads["nn"]))
    scored = {
        h: float(np.sqrt(((t.merge(blend[[ID, "target"]], on=ID).eval("pred - target")) ** 2).mean()))
        for h, t in heads.items()
    }
    if scored:
        best = min(scored, key=scored.get)
        rows.append(part(f"blend vs {best} head", blend.drop(columns="target"), heads[best]))
    return rows


def score_line(weights: dict) -> str | None:
    """An experiment's blend scores in one line, the one to trust first (from its weights.json); None without one."""
    oof, held, nest = (weights.get(k) or {} for k in ("oof_rmse", "holdout_rmse", "nested_rmse"))
    if "ensemble_cv" not in oof:
        return None
    # "trusted": false (or absent: an older version, every fold shipped its own best epoch) makes it optimistic too
    label = "the one to trust" if weights.get("trusted", False) else "optimistic: own-best checkpoints"
    trusted = (
        f"nested RMSE {nest['ensemble']:.3f} ({label})"
        if "ensemble" in nest
        else f"no nested score ({nest.get('missing', 'rerun pawpular all')})"
    )
    holdout = f"; holdout {held['ensemble']:.3f} ({held.get('rows')} rows)" if "ensemble" in held else ""
    return f"{trusted}{holdout}; optimistic: cross-validated {oof['ensemble_cv']:.3f}, in-sample {oof['ensemble']:.3f}"


def heads_line(out: Path) -> str | None:
    """Each blended model's weight and nested RMSE in one line (from weights.json); None without one."""
    from ..store.files import read_json

    try:
        weights = read_json(artifacts.weights_json(out))
    except (OSError, ValueError):
        return None
    if not isinstance(weights, dict):
        return None
    nested = weights.get("nested_rmse") or {}
    parts = [
        f"{name} {w:.2f}" + (f" (nested {nested[name]:.3f})" if name in nested else "")
        for name, w in (weights.get("weights") or {}).items()
    ]
    return ", ".join(parts) or None


def experiment_score_line(out: Path) -> str | None:
    """``score_line`` of the experiment ``out`` (None while it has no readable weights.json)."""
    from ..store.files import ArtifactError, read_json_object

    try:
        return score_line(read_json_object(artifacts.weights_json(out)))
    except (OSError, ArtifactError):  # missing or unreadable; not JSON or not an object
        return None


def _interval(r: dict) -> str:
    return f"{r['delta']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]"


def resampled(rows: list[dict]) -> str:
    """What the intervals resampled: duplicate groups, or single rows when the baseline's folds left none."""
    r = next((r for r in rows if "groups" in r), None)
    if r is None:
        return "duplicate groups"
    if r["groups"] == r["rows"]:
        return f"single rows (the baseline's folds hold no duplicate groups: {r['rows']} rows resampled one by one)"
    return f"duplicate groups ({r['groups']} groups of {r['rows']} rows)"


def text(baseline: str, rows: list[dict], parts: list[dict]) -> str:
    """The comparisons as text: against the baseline, then inside each experiment."""
    spread = next((r["spread"] for r in rows if r.get("verdict") == "baseline"), 0.0)
    repeats = [r["experiment"] for r in rows if r.get("verdict") == "seed repeat"]
    seeds = (
        f"; verdicts widened by the seed spread {spread:.3f} (the baseline's repeats {', '.join(repeats)})"
        if repeats
        else "; row noise only: no seed repeats of the baseline given (--repeats), a seed change alone can come "
        "out better"
    )
    lines = [
        f"against {baseline} (nested RMSE difference, negative is better; 95% paired-bootstrap interval over "
        f"{resampled(rows)}{seeds}; folds won):"
    ]
    for r in rows:
        if "why" in r:
            lines.append(f"  {r['experiment']:<24} not comparable: {r['why']}")
        elif r.get("verdict") == "baseline":
            lines.append(f"  {r['experiment']:<24} (the baseline)")
        else:
            lines.append(
                f"  {r['experiment']:<24} {_interval(r):<28} {r['folds_won']}/{r['folds']} folds  {r['verdict']}"
            )
    if parts:
        lines.append("inside each experiment (nested, the same way):")
        for r in parts:
            what = f"{r['experiment']}: {r['part']}"
            shown = (
                f"not comparable: {r['why']}"
                if "why" in r
                else f"{_interval(r):<28} {r['folds_won']}/{r['folds']} folds  {r['verdict']}"
            )
            lines.append(f"  {what:<40} {shown}")
    return "\n".join(lines)


def with_baseline(df: pd.DataFrame, baseline: str, repeats: list[str] | None = None) -> pd.DataFrame:
    """``experiments.table``'s rows plus, against ``baseline`` (a row's name or path): the nested RMSE difference
    (``vs_baseline``), its interval (``low``, ``high``), ``folds_won`` ("won/folds") and ``verdict`` (better, worse,
    within noise, seed repeat, or "not comparable: why"; ``repeats``: the baseline's config at other seeds, whose
    spread widens every verdict); ``attrs["inside"]``: ``inside`` of every row; ``attrs["baseline"]``."""
    base = _baseline_folder(df, baseline)
    others = [_baseline_folder(df, r, "--repeats") for r in repeats or []]
    rows = against(base, [Path(p) for p in df["path"]], others)
    df = df.copy()
    df["vs_baseline"] = [r.get("delta", np.nan) for r in rows]
    df["low"] = [r.get("low", np.nan) for r in rows]
    df["high"] = [r.get("high", np.nan) for r in rows]
    df["folds_won"] = [f"{r['folds_won']}/{r['folds']}" if "folds" in r else None for r in rows]
    df["verdict"] = [r.get("verdict") or f"not comparable: {r['why']}" for r in rows]  # or "baseline"
    df.attrs["baseline"], df.attrs["against"] = base.name, rows
    df.attrs["inside"] = [part for p in df["path"] for part in inside(Path(p))]
    return df


def _baseline_folder(df: pd.DataFrame, baseline: str, flag: str = "--baseline") -> Path:
    """The one experiment ``baseline`` (given as ``flag``) names (its path, else its name), finished: UsageError
    when none, two (experiments named alike in two folders: both paths named) or an unfinished one (what it lacks)."""
    match = [p for p in df["path"] if Path(p).resolve() == Path(baseline).resolve()]
    match = match or [p for p, name in zip(df["path"], df["experiment"], strict=True) if name == baseline]
    if not match:
        raise UsageError(f"{flag} {baseline}: no such experiment among {', '.join(df['experiment'])}")
    if len(match) > 1:
        raise UsageError(
            f"{flag} {baseline}: {len(match)} experiments have that name ({', '.join(map(str, match))}): "
            "give the baseline's path"
        )
    base = Path(match[0])
    if manifest.read(artifacts.manifest(base, "ensemble")) is None:
        raise UsageError(
            f"{flag} {baseline}: the experiment {base} is not finished (its ensemble stage has not run): "
            f"nothing to compare against; finish it (pawpular all --output {base}) or choose another baseline"
        )
    return base


def baseline_text(df: pd.DataFrame) -> str:
    """What `pawpular runs --baseline` prints under the table."""
    return text(df.attrs["baseline"], df.attrs["against"], df.attrs.get("inside", []))
