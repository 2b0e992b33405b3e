"""`wattlane route-eval` and `wattlane route-calibrate`: score and calibrate the adequacy predictor on a CSV."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from scheduler.cli_text import escape, print_error

err = Console(stderr=True)


def _fail(message: str) -> None:
    print_error(err, message)
    raise typer.Exit(2)


def _load(data: Path, artefact: Optional[Path]):
    from scheduler.routing.adequacy import PredictorError, load_predictor
    from scheduler.routing.data import RoutingDataError, load_csv

    try:
        rows = load_csv(data)
    except RoutingDataError as exc:
        _fail(str(exc))
    try:
        predictor = load_predictor(str(artefact) if artefact else None)
    except PredictorError as exc:
        _fail(str(exc))
    return rows, predictor


def _baseline_summary(rows, predictor) -> tuple[dict | None, str]:
    """The TF-IDF baseline, refitted on the repository's training part with the C recorded in the artefact, scored on rows."""
    from scheduler.routing.data import RoutingDataError
    from scheduler.routing.metrics import routing_curve

    try:
        import sklearn  # noqa: F401
    except ImportError:
        return None, "TF-IDF baseline: skipped (needs scikit-learn: pip install -e '.[train]')"
    c = (predictor.metadata.get("baseline") or {}).get("C")
    if c is None:
        return None, "TF-IDF baseline: skipped (the artefact records no baseline C)"
    from scheduler.routing.baseline import fit_baseline
    from scheduler.routing.train import split_data

    try:
        train = split_data().train
    except RoutingDataError as exc:
        return None, f"TF-IDF baseline: skipped (no training data: {exc})"
    scores = fit_baseline(train, c).scores(rows.prompts)
    return routing_curve(scores, rows.weak_correct, rows.strong_correct).summary(), ""


def route_eval_cmd(
    data: Annotated[Path, typer.Option("--data", help="CSV with columns prompt, weak_correct, strong_correct (0/1)")],
    artefact: Annotated[Optional[Path], typer.Option("--artefact", help="predictor artefact (default: the shipped one)")] = None,
    baseline: Annotated[bool, typer.Option("--baseline/--no-baseline", help="also fit and score the TF-IDF baseline (scikit-learn)")] = True,
) -> None:
    """Evaluate the adequacy predictor, and the TF-IDF baseline beside it, on labelled prompts: APGR, CPT(50%), CPT(80%); last line is JSON."""
    from scheduler.routing.metrics import random_router_summary, routing_curve

    rows, predictor = _load(data, artefact)
    curve = routing_curve(predictor.strong_needed_many(rows.prompts), rows.weak_correct, rows.strong_correct)
    if curve.strong_accuracy <= curve.weak_accuracy:
        _fail(f"{data}: the strong model ({curve.strong_accuracy:.1%}) is not more accurate than the weak one "
              f"({curve.weak_accuracy:.1%}) on this data, so PGR, APGR and CPT are undefined")
    s = curve.summary()
    rnd = random_router_summary(rows.weak_correct, rows.strong_correct, seeds=50)
    print(f"rows: {len(rows)}  weak accuracy: {curve.weak_accuracy:.1%}  strong accuracy: {curve.strong_accuracy:.1%}")
    base, why = _baseline_summary(rows, predictor) if baseline else (None, "")
    def other(key: str, fmt: str) -> str:
        b = f", TF-IDF baseline {base[key]:{fmt}}" if base else ""
        return f"(random router {rnd[key]:{fmt}}{b})"
    print(f"APGR:     {s['apgr']:.3f}   {other('apgr', '.3f')}")
    print(f"CPT(50%): {s['cpt50']:.1%}   {other('cpt50', '.1%')}")
    print(f"CPT(80%): {s['cpt80']:.1%}   {other('cpt80', '.1%')}")
    if why:
        print(why)
    elif base:
        print("TF-IDF baseline: refitted on the repository's training part (rows of that part in this file favour it)")
    out = {"apgr": round(s["apgr"], 4), "cpt50": round(s["cpt50"], 4), "cpt80": round(s["cpt80"], 4)}
    if base:
        out["baseline"] = {k: round(v, 4) for k, v in base.items()}
    print(json.dumps(out))


def route_calibrate_cmd(
    data: Annotated[Optional[Path], typer.Option("--data", help="CSV with columns prompt, weak_correct, strong_correct (0/1)")] = None,
    training_split: Annotated[bool, typer.Option(
        "--training-split", help="calibrate on the repository's training part, each row scored out of fold (needs scikit-learn; "
        "reads no held-out row)")] = False,
    target_pgr: Annotated[Optional[float], typer.Option("--target-pgr", help="recover this share of the strong model's quality (0..1)")] = None,
    target_retained: Annotated[Optional[float], typer.Option(
        "--target-retained", help="keep this share of the strong model's accuracy (0..1; routed accuracy / always-strong accuracy)")] = None,
    strong_share: Annotated[Optional[float], typer.Option("--strong-share", help="send this share of requests to the strong model (0..1)")] = None,
    write: Annotated[Optional[Path], typer.Option("--write", help="also write the YAML snippet to this file")] = None,
    artefact: Annotated[Optional[Path], typer.Option("--artefact", help="predictor artefact (default: the shipped one)")] = None,
) -> None:
    """Compute routing.default_min_quality from labelled data for a target PGR, accuracy retained or strong-model share."""
    from scheduler.routing.calibrate import calibrate, calibrate_training

    goals = {"target_pgr": target_pgr, "target_retained": target_retained, "strong_share": strong_share}
    if sum(v is not None for v in goals.values()) != 1:
        _fail("give exactly one of --target-pgr, --target-retained or --strong-share")
    for name, v in (("--target-pgr", target_pgr), ("--target-retained", target_retained), ("--strong-share", strong_share)):
        if v is not None and not 0.0 <= v <= 1.0:
            _fail(f"{name} must be between 0 and 1, got {v}")
    if (data is None) == (not training_split):
        _fail("give exactly one of --data FILE or --training-split")
    if training_split:
        from scheduler.routing.adequacy import PredictorError, load_predictor
        from scheduler.routing.data import RoutingDataError

        try:
            import sklearn  # noqa: F401
        except ImportError:
            _fail("--training-split needs scikit-learn (pip install -e '.[train]')")
        try:
            predictor = load_predictor(str(artefact) if artefact else None)
            cal = calibrate_training(predictor, **goals)
        except (PredictorError, RoutingDataError, ValueError) as exc:
            _fail(str(exc))
        source = "the training split, out-of-fold scores"
    else:
        rows, predictor = _load(data, artefact)
        try:
            cal = calibrate(predictor, rows, **goals)
        except ValueError as exc:
            _fail(f"{data}: {exc}")
        source = str(data)
    snippet = cal.yaml_snippet(source)
    print(snippet, end="")
    if write:
        try:
            write.write_text(snippet)
        except OSError as exc:
            _fail(f"cannot write {write}: {exc}")
        err.print(escape(f"wrote {write}"))


def register(app: typer.Typer) -> None:
    app.command("route-eval")(route_eval_cmd)
    app.command("route-calibrate")(route_calibrate_cmd)
