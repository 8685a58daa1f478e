"""Stage 5, ensemble: blend the heads with weights fit on out-of-fold predictions -> submission.csv.

Reads   train/{oof,test,holdout}.parquet (NN head), svr/{oof,test,holdout}.parquet (SVR head) and
        svr/<name>/... (the SVR heads of svr.heads) of this experiment (its ensemble.heads) and of every folder in
        ensemble.experiments (all their heads); folds/folds.csv; train.csv; sample_submission.csv
Writes  ensemble/weights.json (weights, every model's OOF RMSE, the cross-validated and holdout RMSE),
        ensemble/{oof,test,holdout}.parquet, submission.csv (Id,Pawpularity in sample order, checked as the
        grader checks it)
Needs   pawpular train and/or pawpular svr (a head that has not run is left out, with a warning)
Keys    ensemble.heads, ensemble.method (convex | hill; nnls = convex), ensemble.min_improvement,
        ensemble.experiments
Run     pawpular ensemble --config configs/default.yaml

Four scores: the in-sample blend RMSE (weights fit and scored on the same OOF rows: flattering), the
cross-validated one (weights refit without each fold, scored on it: still optimistic, the SVR's C was chosen on
those rows), the nested one (the same blend of the heads' nested predictions, ensemble/nested.parquet: C and the
weights chosen without the fold scored; the one to trust unless ``scores/trust.py`` names a choice made upstream on all
rows: own-best checkpoints or select's sets, and then weights.json says "trusted": false), and with
folds.holdout > 0 the holdout RMSE of the submission's own recipe on rows no stage ever fit on. A head or blend no
better than predicting the mean is a loud warning here and in the report.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.splits import HOLDOUT, read_folds
from ..data.tables import ID, TARGET
from ..logs import tracking
from ..scores import trust
from ..scores.blend import canonical, cross_validated, fit_weights
from ..scores.metrics import rmse
from ..scores.submission import build_submission
from ..store import artifacts, manifest
from ..store.errors import ConfigError
from ..store.files import ArtifactError, MissingArtifact, not_a_file, remove, write_csv, write_json, write_parquet
from . import Plan, Result

log = logging.getLogger("pawpular")
TRUST = (
    "nested_rmse.ensemble is the score to trust: every choice (C, blend weights) made without the fold scored, on "
    "checkpoints whose epoch no rows chose (train.checkpoint: last); oof_rmse.ensemble_cv is optimistic (the heads' "
    "C was chosen on the rows it scores), oof_rmse.ensemble more so (its weights too)"
)
UNTRUSTED = (
    "no score here is to be trusted, nested_rmse included: {why} (a choice made on the rows it is scored on, which "
    "the nested score does not redo)"
)
SUMMARY = "blend the NN and SVR heads with weights fit on out-of-fold predictions -> submission.csv"
HELP = __doc__
IMAGES = False


def experiments(cfg) -> list[tuple[str, Path]]:
    """(model-name prefix, experiment folder): this one, then ensemble.experiments (names checked unique)."""
    return artifacts.blend_members(cfg.out, cfg.ensemble.experiments)


def _heads(out: Path, wanted: list[str] | None = None) -> list[str]:
    """Heads of an experiment whose predictions exist (of ``wanted``, when given): nn, svr, then the SVR heads
    of svr.heads."""
    every = [*artifacts.HEADS, *artifacts.extra_svr_heads(out)]
    return [h for h in every if artifacts.preds(out, h, "oof").is_file() and (wanted is None or h in wanted)]


def _used(cfg, prefix: str) -> list[str] | None:
    """This experiment's heads come from ensemble.heads; another experiment's: all it has."""
    return None if prefix else list(cfg.ensemble.heads)


def _pred_files(cfg) -> list[Path]:
    return [
        artifacts.preds(folder, h, s)
        for prefix, folder in experiments(cfg)
        for h in _heads(folder, _used(cfg, prefix))
        for s in artifacts.PRED_SPLITS
        if s != "holdout" or artifacts.preds(folder, h, s).is_file()
    ]


def plan(ctx) -> Plan:
    cfg = ctx.cfg
    inputs = {
        **ctx.file_inputs([artifacts.folds_csv(ctx.out), *_pred_files(cfg)]),
        **ctx.data_inputs("train.csv", "sample_submission.csv"),
    }
    # a blend made before members were compared: `status` says which member saw other data
    other_data = (lambda _record: _other_data(ctx)) if cfg.ensemble.experiments else None
    return Plan({"ensemble": dataclasses.asdict(cfg.ensemble)}, inputs, other_data)


def check(ctx) -> None:
    """Before anything changes: every folder of ensemble.experiments is an experiment with whole predictions of
    the same Ids on the same folds."""
    from ..store.guards import is_experiment

    for _prefix, folder in experiments(ctx.cfg)[1:]:
        if not folder.is_dir():
            raise ConfigError(
                f"ensemble.experiments: {folder} {not_a_file(folder) or 'is a file, not a folder'}: "
                "list experiment folders",
                ("ensemble.experiments",),
            )
        if not is_experiment(folder):
            raise ConfigError(
                f"ensemble.experiments: {folder} holds no pawpular experiment (no config.yaml or stage "
                "manifest): list experiment folders",
                ("ensemble.experiments",),
            )
    gather(ctx.cfg)  # whole predictions of the same Ids on the same folds (it reads them: small tables)
    if len(experiments(ctx.cfg)) > 1:
        _check_same_data(ctx)


def _other_data(ctx) -> list[str]:
    """Per blended experiment made on other data than this one's (``member_data.other_data``): what differs."""
    from ..scores.member_data import other_data

    now = ctx.data_inputs("train.csv", "test.csv", images=True)
    return other_data(now, ctx.cfg.data, [folder for _prefix, folder in experiments(ctx.cfg)[1:]])


def _check_same_data(ctx) -> None:
    """Every blended experiment was made on this experiment's data (``_other_data``), or ConfigError naming it."""
    if found := _other_data(ctx):
        raise ConfigError(
            f"ensemble.experiments: {found[0]}; blend only experiments made on the same data: rerun it with this "
            "data_dir, or leave it out",
            ("ensemble.experiments",),
        )


def _check_foreign(prefix: str, folder: Path) -> None:
    """Another experiment's heads must be whole: their manifests' output digests must hold."""
    for h in _heads(folder):
        record = manifest.read(artifacts.manifest(folder, artifacts.head_stage(h)))
        problems = ["no manifest (not finished)"] if record is None else manifest.damaged_outputs(record, folder)
        if problems:
            raise ArtifactError(
                f"{folder} (in ensemble.experiments): its {artifacts.head_stage(h)} stage is not whole: "
                f"{'; '.join(problems[:3])}; rerun it there"
            )


def gather(cfg) -> tuple[list[str], dict[str, pd.DataFrame]]:
    """Names, and per split (oof, test, holdout) a table of Id (+ fold for oof) and one column per model."""
    names, parts = [], {s: [] for s in artifacts.PRED_SPLITS}
    for prefix, folder in experiments(cfg):
        found = _heads(folder, _used(cfg, prefix))
        missing = [h for h in (_used(cfg, prefix) or artifacts.HEADS) if h not in found]
        if prefix:
            if not found:
                raise MissingArtifact(f"{folder} (in ensemble.experiments) has no train/ or svr/ predictions")
            _check_foreign(prefix, folder)
        for h in missing:
            log.warning("no %s predictions in %s: blending without that head", h, folder)
        for h in found:
            name = f"{prefix}{h}"
            names.append(name)
            for split in artifacts.PRED_SPLITS:
                path = artifacts.preds(folder, h, split)
                if path.is_file():
                    cols = [ID, "pred"] + (["fold"] if split == "oof" else [])
                    parts[split].append(
                        pd.read_parquet(path)[cols].rename(columns={"pred": name, "fold": f"fold:{name}"})
                    )
    if not names:
        raise MissingArtifact(f"no predictions to blend in {cfg.out}: run `pawpular train` and/or `pawpular svr` first")
    return names, {s: _join(tables, names, s) for s, tables in parts.items() if tables}


def _join(tables: list[pd.DataFrame], names: list[str], split: str) -> pd.DataFrame:
    table = tables[0]
    for t in tables[1:]:
        table = table.merge(t, on=ID, how="outer")
    if len(tables) != len(names) or table[names].isna().any().any():
        bad = [n for n in names if n not in table or table[n].isna().any()]
        raise ConfigError(
            f"{split} predictions do not cover the same Ids: {', '.join(bad)} miss some "
            "(rerun them on the same data and folds)"
        )
    if split == "oof":
        fold_cols = [f"fold:{n}" for n in names]
        if (table[fold_cols].nunique(axis=1) > 1).any():
            raise ConfigError(
                "ensemble.experiments: the blended models used different folds: OOF weights would leak; "
                "use one folds.csv for all"
            )
        table = table.rename(columns={fold_cols[0]: "fold"}).drop(columns=fold_cols[1:])
    return table


def run(ctx) -> Result:
    cfg, comp = ctx.cfg, ctx.comp
    folds = read_folds(cfg.out, comp.train, cfg.folds)
    names, tables = gather(cfg)
    target = comp.train.set_index(ID)[TARGET].astype(float)
    oof = tables["oof"]
    expected = int((folds["fold"] != HOLDOUT).sum())
    if len(oof) != expected or not oof[ID].isin(target.index).all():
        raise ArtifactError(f"OOF predictions cover {len(oof)} train Ids; folds.csv assigns {expected} to folds")
    y, P = target.loc[oof[ID]].to_numpy(), oof[names].to_numpy(float)
    method, min_imp = cfg.ensemble.method, cfg.ensemble.min_improvement
    blend = fit_weights(P, y, names, method, min_imp)
    scores = {n: rmse(P[:, j], y) for j, n in enumerate(names)}
    cv, _ = cross_validated(P, y, oof["fold"].to_numpy(), names, method, min_imp)
    summary = {
        **scores,
        "ensemble": rmse(np.clip(P @ blend.weights, 1, 100), y),
        "ensemble_cv": cv,
        "equal_weights": rmse(np.clip(P.mean(1), 1, 100), y),
        "predict_mean": rmse(np.full_like(y, y.mean()), y),
    }
    holdout = _holdout_scores(tables, names, blend.weights, target, y.mean())
    policies = _policies(cfg)
    nested_scores = _nested(ctx, names, oof, y)
    outputs = _write(ctx, tables, names, blend, summary, holdout, policies, nested_scores)
    _log(cfg, names, blend, summary, holdout, nested_scores)
    tracking.log_blend(ctx.tracker, dict(zip(names, map(float, blend.weights), strict=False)), summary, holdout)
    return Result(outputs, {"oof_rmse": summary, "holdout_rmse": holdout})


def _holdout_scores(tables: dict, names: list[str], w: np.ndarray, target: pd.Series, train_mean: float) -> dict:
    if "holdout" not in tables:
        return {}
    h = tables["holdout"]
    y = target.loc[h[ID]].to_numpy()
    H = h[names].to_numpy(float)
    return {
        **{n: rmse(H[:, j], y) for j, n in enumerate(names)},
        "ensemble": rmse(np.clip(H @ w, 1, 100), y),
        "predict_mean": rmse(np.full_like(y, train_mean), y),
        "rows": int(len(y)),
    }


def _nested(ctx, names: list[str], oof: pd.DataFrame, y: np.ndarray) -> dict:
    """Every head's nested RMSE (its epoch or C chosen without the fold scored) and the blend's (weights fit on the
    other folds' nested predictions); writes ensemble/nested.parquet. ``{"missing": why}`` when a head has none."""
    path = artifacts.nested_preds(ctx.out, "ensemble")
    remove(path)
    files = {
        f"{prefix}{h}": artifacts.nested_preds(folder, h)
        for prefix, folder in experiments(ctx.cfg)
        for h in _heads(folder, _used(ctx.cfg, prefix))
    }
    missing = [f"{n} ({files[n]})" for n in names if not files[n].is_file()]
    if missing:
        return {
            "missing": f"no nested predictions for {', '.join(missing)}: rerun that stage (train with --overwrite "
            "where train.checkpoint: best and a new TTA removed the per-epoch predictions)"
        }
    table = oof[[ID, "fold"]]
    for n in names:
        table = table.merge(pd.read_parquet(files[n])[[ID, "pred"]].rename(columns={"pred": n}), on=ID, how="left")
    if table[names].isna().any().any():
        return {"missing": "the nested predictions do not cover the OOF rows: rerun train / svr"}
    P = table[names].to_numpy(float)
    score, pred = cross_validated(
        P, y, table["fold"].to_numpy(), names, ctx.cfg.ensemble.method, ctx.cfg.ensemble.min_improvement
    )
    # the target too: `pawpular runs --baseline` compares experiments from this file alone
    write_parquet(pd.DataFrame({ID: table[ID], "fold": table["fold"], "pred": pred, "target": y}), path)
    return {**{n: rmse(P[:, j], y) for j, n in enumerate(names)}, "ensemble": score}


def optimistic_because(cfg) -> str | None:
    """Why no score of this blend can be trusted (``scores/trust.py``), or None."""
    members = experiments(cfg)
    return trust.optimistic_because(cfg, members, {p: _heads(f, _used(cfg, p)) for p, f in members})


def _policies(cfg) -> dict[str, str]:
    """The precision each blended experiment's models and embeddings were made with (their own manifests); a
    warning when they differ: predict repeats each one's own, but the heads were fit on mixed inputs."""
    found = {
        f"{prefix}{unit}": p["precision"]
        for prefix, folder in experiments(cfg)
        for unit, p in manifest.policies(folder).items()
    }
    if len(set(found.values())) > 1:
        by = {}
        for unit, precision in sorted(found.items()):
            by.setdefault(precision, []).append(unit)
        log.warning(
            "ensemble: the blended models and embeddings were made under different inference policies "
            "(%s): the SVR heads were fit on embeddings of mixed precision; predict repeats each model's "
            "own policy",
            "; ".join(f"{p}: {', '.join(u[:4])}{' ...' if len(u) > 4 else ''}" for p, u in sorted(by.items())),
        )
    return found


def _write(
    ctx, tables: dict, names: list[str], blend, summary: dict, holdout: dict, policies: dict, nested_scores: dict
) -> list[Path]:
    out, w = ctx.out / "ensemble", blend.weights
    oof = tables["oof"]
    untrusted = optimistic_because(ctx.cfg)
    paths = [out / "oof.parquet", out / "test.parquet"]
    write_parquet(
        pd.DataFrame({ID: oof[ID], "fold": oof["fold"], "pred": np.clip(oof[names].to_numpy(float) @ w, 1, 100)}),
        paths[0],
    )
    test = pd.DataFrame({ID: tables["test"][ID], "pred": np.clip(tables["test"][names].to_numpy(float) @ w, 1, 100)})
    write_parquet(test, paths[1])
    if "holdout" in tables:
        h = tables["holdout"]
        paths.append(out / "holdout.parquet")
        write_parquet(pd.DataFrame({ID: h[ID], "pred": np.clip(h[names].to_numpy(float) @ w, 1, 100)}), paths[-1])
    sub = build_submission(test, ctx.comp.sample)  # validated before anything is written for it
    write_json(
        artifacts.weights_json(ctx.out),
        {
            "weights": dict(zip(names, map(float, w), strict=False)),
            "method": canonical(ctx.cfg.ensemble.method),
            "oof_rmse": summary,
            "nested_rmse": nested_scores,
            "trusted": untrusted is None,
            "trust": TRUST if untrusted is None else UNTRUSTED.format(why=untrusted),
            "holdout_rmse": holdout,
            "worse_than_mean": worse_than_mean(summary, holdout),
            "precision": policies,
            "steps": [{"added": a, "oof_rmse": r} for a, r in blend.steps],
        },
    )
    write_csv(sub, artifacts.submission(ctx.out), float_format="%.5f")
    nested_file = [artifacts.nested_preds(ctx.out, "ensemble")] if "ensemble" in nested_scores else []
    return paths + nested_file + [artifacts.weights_json(ctx.out), artifacts.submission(ctx.out)]


def worse_than_mean(summary: dict, holdout: dict) -> list[str]:
    """Models (and the blend) whose OOF (or holdout) RMSE is no better than predicting the mean."""
    bad = []
    for scores, where in ((summary, "OOF"), (holdout, "holdout")):
        mean = scores.get("predict_mean")
        for name, value in scores.items():
            if name not in ("predict_mean", "equal_weights", "rows") and mean is not None and value >= mean:
                bad.append(f"{name} {where} RMSE {value:.3f} >= predicting the mean {mean:.3f}")
    return bad


def _log(cfg, names: list[str], blend, summary: dict, holdout: dict, nested_scores: dict) -> None:
    mean = summary["predict_mean"]
    ratio = summary["ensemble_cv"] / mean if mean > 0 else float("nan")
    rows = [f"  {n:<24} {summary[n]:>8.3f} {w:>8.3f}" for n, w in zip(names, blend.weights, strict=False)]
    rows += [
        f"  {'predict the mean':<24} {mean:>8.3f}",
        f"  {'equal-weight blend':<24} {summary['equal_weights']:>8.3f}",
        f"  {'ensemble (in-sample)':<24} {summary['ensemble']:>8.3f}",
        f"  {'ensemble (cross-val.)':<24} {summary['ensemble_cv']:>8.3f}  ({ratio:.3f}x the mean's; optimistic: "
        "the heads' epoch and C were chosen on these rows)",
    ]
    untrusted = optimistic_because(cfg)
    if "ensemble" in nested_scores and untrusted is None:
        rows.append(
            f"  {'ensemble (nested)':<24} {nested_scores['ensemble']:>8.3f}  (every choice made without the "
            "fold scored: the one to trust)"
        )
    elif "ensemble" in nested_scores:
        rows.append(f"  {'ensemble (nested)':<24} {nested_scores['ensemble']:>8.3f}  (optimistic too: {untrusted})")
    else:
        rows.append(f"  {'ensemble (nested)':<24} {'-':>8}  ({nested_scores.get('missing')})")
    if holdout:
        rows.append(
            f"  {'holdout RMSE':<24} {holdout['ensemble']:>8.3f}  ({holdout['rows']} rows no stage fit on; "
            f"the mean: {holdout['predict_mean']:.3f})"
        )
    log.info(
        "ensemble (%s):\n  %-24s %8s %8s\n%s\nsubmission: %s",
        canonical(cfg.ensemble.method),
        "model",
        "OOF RMSE",
        "weight",
        "\n".join(rows),
        artifacts.submission(cfg.out),
    )
    if cfg.ensemble.method == "hill":
        log.info("hill climbing: %s", " -> ".join(f"{a} {r:.3f}" for a, r in blend.steps))
    for line in worse_than_mean(summary, holdout):
        log.warning("WARNING: %s: this model adds nothing; check the data, the folds and the training", line)
