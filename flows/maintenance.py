"""Prefect flow `cache-prune`: `vct cache prune` on a schedule (infra/prefect.yaml ships it
inactive). The listing, the choice and the deletion are the library's (vct.batch.cache_admin);
this flow only parses its parameters and publishes what went as a table artifact."""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from vct.batch import cache_admin as A


@flow(name="cache-prune", log_prints=True)
def cache_prune(cache_uri: str = "", model_cache: bool = False, older_than: str | None = "30d",
                max_size: str | None = None, kinds: list[str] | None = None,
                models: list[str] | None = None, dry_run: bool = True) -> dict:
    """Delete the stage cache's (or the model cache's) entries unused for `older_than`, then
    the least recently used until it fits `max_size`; never one under a live claim or in use.

    Args:
        cache_uri: the stage cache (folder or s3:// prefix), e.g. s3://bucket/restyled/_cache.
        model_cache: prune this worker's model cache (VCT_MODEL_CACHE) instead.
        older_than: an age: 30d, 12h, 90m; empty = no age bound.
        max_size: a size: 500G, 1.5T; empty = no size bound.
        kinds, models: only entries of these kinds, or of models whose identity starts so.
        dry_run: only report what would go (the default: set false once the report looks right).
    """
    older = A.parse_age(older_than) if older_than else None
    size = A.parse_size(max_size) if max_size else None
    now = time.time()
    listing = A.list_cache(cache_uri or None, model_cache, now)
    chosen = A.select(listing.entries, now, older_than_s=older, max_bytes=size, kinds=kinds,
                      models=models, protected=listing.protected)
    pruned = A.Pruned([], []) if dry_run else A.prune(listing, chosen)
    gone = chosen if dry_run else pruned.deleted
    rows = [{"kind": e.kind, "key": e.key, "model": e.model or "", "bytes": e.size,
             "unused": A.human_age(e.age(now))} for e in gone]
    verb = "would delete" if dry_run else "deleted"
    create_table_artifact(table=rows or [{"kind": "", "key": "nothing", "model": "",
                                          "bytes": 0, "unused": ""}],
                          key="cache-prune", description=f"{verb} from {listing.root}")
    result = {"root": listing.root, "dry_run": dry_run, "entries": len(listing.entries),
              "deleted": len(gone), "bytes": sum(e.size for e in gone),
              "kept_protected": len(listing.protected) + len(pruned.kept_claimed)}
    get_run_logger().info("%s %d entries (%s) of %d in %s", verb, result["deleted"],
                          A.human_size(result["bytes"]), result["entries"], listing.root)
    return result
