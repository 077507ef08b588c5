"""Writes deploy/grafana/tsimcne-dashboard.json (the dashboard is generated so that it stays valid JSON
and consistent; edit the panel list here, then run: python deploy/grafana/make_dashboard.py [OUT.json])."""

from __future__ import annotations

import json
from pathlib import Path

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# POST /embed is answered in front of BentoML's request middlewares and counts itself (serving/embed_route.py).
EMBED_LATENCY = "sum by (le) (rate(tsimcne_embed_request_seconds_bucket[5m]))"
JOURNAL_WRITE = "sum by (le) (rate(tsimcne_journal_write_seconds_bucket[5m]))"


def panel(
    title: str,
    targets: list[tuple[str, str]],
    x: int,
    y: int,
    kind: str = "timeseries",
    unit: str = "short",
    w: int = 12,
    h: int = 8,
    description: str = "",
) -> dict:
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": chr(65 + i)}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


PANELS = [
    panel(
        "Images placed per second", [("sum(rate(tsimcne_images_embedded_total[5m]))", "images/s")], 0, 0, unit="reqps"
    ),
    panel(
        "Share of images flagged, by kind",
        [
            (
                "sum by (kind) (rate(tsimcne_images_flagged_total[15m]))"
                " / scalar(sum(rate(tsimcne_images_embedded_total[15m])))",
                "{{kind}}",
            )
        ],
        12,
        0,
        unit="percentunit",
        description="Calibrated to 1 % false flags on clean images; a rise means new kinds of images arrive.",
    ),
    panel(
        "Flag score distribution",
        [("sum by (le) (increase(tsimcne_flag_score_bucket[15m]))", "{{le}}")],
        0,
        8,
        kind="heatmap",
        description="Score = k-th neighbour distance / calibrated threshold; above 1 is flagged.",
    ),
    panel(
        "Where new images land (majority label of their map neighbours)",
        [("sum by (label) (increase(tsimcne_images_by_region_total[1h]))", "{{label}}")],
        12,
        8,
        kind="barchart",
    ),
    panel(
        "Model time per run (p50, p99)",
        [
            ("histogram_quantile(0.5, sum by (le) (rate(tsimcne_model_seconds_bucket[5m])))", "p50"),
            ("histogram_quantile(0.99, sum by (le) (rate(tsimcne_model_seconds_bucket[5m])))", "p99"),
        ],
        0,
        16,
        unit="s",
    ),
    panel(
        "Images per model run (adaptive batching)",
        [("sum(rate(tsimcne_batch_images_sum[5m])) / sum(rate(tsimcne_batch_images_count[5m]))", "mean batch")],
        12,
        16,
    ),
    panel(
        "HTTP requests by endpoint and status",
        [
            ("sum by (status) (rate(tsimcne_embed_requests_total[5m]))", "/embed {{status}}"),
            (
                "sum by (endpoint, http_response_code) (rate(bentoml_service_request_total[5m]))",
                "{{endpoint}} {{http_response_code}}",
            ),
        ],
        0,
        24,
        unit="reqps",
    ),
    panel(
        "HTTP latency of /embed (p50, p99)",
        [
            (
                f"histogram_quantile(0.5, {EMBED_LATENCY})",
                "p50",
            ),
            (
                f"histogram_quantile(0.99, {EMBED_LATENCY})",
                "p99",
            ),
        ],
        12,
        24,
        unit="s",
    ),
    panel(
        "Unusable uploads and refused requests",
        [
            ("sum by (reason) (increase(tsimcne_decode_errors_total[15m]))", "decode: {{reason}}"),
            ("sum by (reason) (increase(tsimcne_rejected_requests_total[15m]))", "refused: {{reason}}"),
        ],
        0,
        32,
    ),
    panel("Bundle being served", [("tsimcne_bundle_info", "{{bundle}} {{provider}} {{sha256}}")], 12, 32, kind="table"),
    # The journal (setting `journal`): empty when it is off.
    panel(
        "Journal: placed images kept per second",
        [("sum(rate(tsimcne_journal_rows_total[5m]))", "rows/s")],
        0,
        40,
        w=8,
        unit="reqps",
        description="Every placed image is kept before its request is answered; this follows images placed/s.",
    ),
    panel(
        "Journal: time to keep a model batch (p50, p99)",
        [
            (f"histogram_quantile(0.5, {JOURNAL_WRITE})", "p50"),
            (f"histogram_quantile(0.99, {JOURNAL_WRITE})", "p99"),
        ],
        8,
        40,
        w=8,
        unit="s",
        description="What /embed waits for: the append to the spool (SQLite, PostgreSQL with journal_spool; taken "
        "into the database once a second), else PostgreSQL's transaction (group commit). A rising p99 means a slow "
        "disk (the spool, journal_sync=full) or a busy database (PostgreSQL without a spool).",
    ),
    panel(
        "Journal: failed batches (answered 503)",
        [("sum(increase(tsimcne_journal_failures_total[5m]))", "failed batches / 5 min")],
        16,
        40,
        w=8,
        description="Any is an outage of /embed (alert TsimcneJournalFailing): full disk, lost database, locks.",
    ),
    # Drift, from the journal (all replicas; every replica reports the same numbers, hence max).
    panel(
        "Drift: share flagged today, by source, against the calibrated rate",
        [
            ("max by (source) (tsimcne_drift_flagged_share)", "{{source}}"),
            ("max(tsimcne_flag_target_rate)", "calibrated rate"),
            ("3 * max(tsimcne_flag_target_rate)", "alert line (3x, with 200+ images)"),
        ],
        0,
        48,
        w=8,
        unit="percentunit",
        description="Images placed since 00:00 UTC that were flagged, per source (the client's instrument or "
        "pipeline; none: not given). Far above the calibrated rate: the source drifted (alert "
        "TsimcneFlagShareHigh); its flagged images are in the page's review queue, its days in GET /drift.",
    ),
    panel(
        "Drift: images placed today, by source",
        [("max by (source) (tsimcne_drift_images)", "{{source}}")],
        8,
        48,
        w=8,
        description="Since 00:00 UTC, from the journal: how much each share on the left rests on.",
    ),
    panel(
        "Drift: median distance to the nearest reference image, by source",
        [("max by (source) (tsimcne_drift_median_nearest_distance)", "{{source}}")],
        16,
        48,
        w=8,
        description="Today's images, per source: rising means they look less like the reference map (a new "
        "stain, scanner or focus), often before the flagged share moves.",
    ),
]

DASHBOARD = {
    "title": "tsimcne map service",
    "uid": "tsimcne-map",
    "tags": ["tsimcne", "microscopy"],
    "timezone": "browser",
    "schemaVersion": 39,
    "version": 1,
    "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"},
    "templating": {
        "list": [{"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"}]
    },
    "panels": [{**p, "id": i + 1} for i, p in enumerate(PANELS)],
}

if __name__ == "__main__":
    import sys

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("tsimcne-dashboard.json")
    target.write_text(json.dumps(DASHBOARD, indent=2) + "\n")
    print(f"wrote {target}")
