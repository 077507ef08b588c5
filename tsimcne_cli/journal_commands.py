"""`tsimcne journal stats | export | prune`: looking after a service's journal from the command line (the
same URL as the service's `journal` setting)."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer

from tsimcne_core.journal import MAX_PAGE, READ_COLUMNS, JournalError, PlacementFilter, flat_values, open_journal
from tsimcne_core.journal_input import MetadataError, utc_time

journal_app = typer.Typer(help="Read, export and prune a service's journal of placed images.", no_args_is_help=True)
Url = Annotated[str, typer.Argument(help="the journal: sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB")]


def _journal_errors(command: Any) -> Any:
    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except JournalError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper


@journal_app.command()
@_journal_errors
def stats(url: Url) -> None:
    """Rows, first and last time, by flag, by source, how many reviewed."""
    summary = open_journal(url).stats()
    for key, value in summary.items():
        typer.echo(f"{key:<15} {json.dumps(value) if isinstance(value, dict) else value}")


@journal_app.command()
@_journal_errors
def export(
    url: Url,
    out: Annotated[Path, typer.Option(help="a .csv or .jsonl file (written whole, then put in place)")],
    since: Annotated[str | None, typer.Option(help="from this time on (ISO 8601, UTC)")] = None,
    until: Annotated[str | None, typer.Option(help="before this time (ISO 8601, UTC)")] = None,
    flag: Annotated[str | None, typer.Option(help="in_distribution, out_of_distribution or artefact")] = None,
    source: Annotated[str | None, typer.Option(help="the client's source")] = None,
    review: Annotated[str | None, typer.Option(help="review state: unreviewed, fine, artefact or a label")] = None,
) -> None:
    """Every matching placement (without its image) to a CSV or JSON-lines file."""
    if out.suffix not in (".csv", ".jsonl"):
        typer.echo(f"error: {out}: the output must end in .csv or .jsonl", err=True)
        raise typer.Exit(2)
    journal = open_journal(url)
    try:
        since, until = utc_time("--since", since), utc_time("--until", until)
    except MetadataError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    where = PlacementFilter(since, until, flag, None, source, review)
    scratch = out.with_name(out.name + ".partial")
    count, after = 0, None
    with scratch.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle) if out.suffix == ".csv" else None
        if writer is not None:
            writer.writerow(READ_COLUMNS)
        while True:
            rows = journal.placements(where, after, MAX_PAGE)
            for row in rows:
                if writer is not None:
                    writer.writerow(flat_values(row))
                else:
                    handle.write(json.dumps(row) + "\n")
            count += len(rows)
            if len(rows) < MAX_PAGE:
                break
            after = rows[-1]["id"]
            typer.echo(f"{count:,} placements ...", err=True)
    scratch.replace(out)
    typer.echo(f"wrote {count:,} placements to {out}")


@journal_app.command()
@_journal_errors
def prune(
    url: Url,
    older_than_days: Annotated[
        float, typer.Option("--older-than-days", min=0, help="delete placements older than this")
    ],
) -> None:
    """Delete the placements made more than N days ago."""
    before = (datetime.now(UTC) - timedelta(days=older_than_days)).isoformat(timespec="microseconds")
    gone = open_journal(url).prune(before)
    typer.echo(f"deleted {gone:,} placements made before {before}")


def _fold_errors(command: Any) -> Any:
    """Bad input to `fold` (journal, bundle, data, out folder) as one `error:` line and exit code 2."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from tsimcne_core.bundle_format import BundleError
        from tsimcne_core.errors import UserError
        from tsimcne_core.images import ImageDecodeError

        try:
            return command(*args, **kwargs)
        except (JournalError, UserError, BundleError, ImageDecodeError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper


@journal_app.command()
@_fold_errors
def fold(
    url: Url,
    bundle: Annotated[Path, typer.Option(help="the bundle the journal's rows were placed with (only read)")],
    out: Annotated[Path, typer.Option(help="the new bundle folder to create, e.g. models/NAME-2")],
    calibration_data: Annotated[
        str | None,
        typer.Option(help="clean images of the collection never trained on nor folded, to calibrate the flag on"),
    ] = None,
    target_rate: Annotated[
        float | None,
        typer.Option(help="false-flag rate to calibrate to (default: the bundle's)", min=0.0001, max=0.5),
    ] = None,
) -> None:
    """Write a new bundle whose reference map also holds the images reviewed as fine (or with a class name)."""
    from training.fold import describe_skipped, fold_bundle

    result = fold_bundle(url, bundle, out, calibration_data, target_rate)
    typer.echo(
        f"bundle written to {result.out}: {result.folded:,} journal images folded into the reference "
        f"({result.reference_size:,} images now)"
    )
    if result.skipped:
        typer.echo(f"left out: {describe_skipped(result.skipped)}")
    calibration = result.manifest.calibration
    interval = getattr(calibration, "false_flag_rate", None)
    if calibration is not None and interval is not None:
        typer.echo(interval.describe(calibration.target_false_flag_rate))
