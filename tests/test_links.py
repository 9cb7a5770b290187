"""Links a person can open to a stored object (vct.storage.share_link): a presigned GET URL on
S3 (fetched here over HTTP from the moto server), a file:// URI locally; and the run setting
that bounds a presigned URL's life."""

from __future__ import annotations

import urllib.error
import urllib.request
from urllib.parse import parse_qs, urlparse

import pytest

from vct import storage
from vct.batch.settings import RunSettings
from vct.cli import build_parser, settings_from
from vct.config import ConfigError


def _open(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def test_a_local_link_is_the_absolute_file_uri(tmp_path, monkeypatch):
    (tmp_path / "run one").mkdir()
    (tmp_path / "run one" / "report.html").write_text("<p>report</p>")
    monkeypatch.chdir(tmp_path)
    link = storage.share_link("run one/report.html")
    assert link == (tmp_path / "run one" / "report.html").resolve().as_uri()
    assert link.startswith("file:///") and " " not in link
    assert _open(link) == b"<p>report</p>"


def test_an_s3_link_is_presigned_for_its_key_and_expiry(s3_bucket):
    uri = f"{s3_bucket}/runs/r1/report.html"
    storage.write_bytes(uri, b"<p>report</p>", content_type="text/html")
    link = storage.share_link(uri, 3600)
    parsed, query = urlparse(link), parse_qs(urlparse(link).query)
    assert parsed.path.endswith("/runs/r1/report.html") and query["X-Amz-Expires"] == ["3600"]
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"] and "X-Amz-Signature" in query
    assert _open(link) == b"<p>report</p>"  # no credentials needed: the URL carries them
    # (moto does not check signatures, so a forged URL is not tried here)
    assert parse_qs(urlparse(storage.share_link(uri)).query)["X-Amz-Expires"] == ["604800"]
    with pytest.raises(ValueError, match="link expiry"):
        storage.share_link(uri, storage.MAX_LINK_EXPIRY_S + 1)


def test_the_link_expiry_is_a_checked_setting_and_flag():
    assert RunSettings().report_link_expiry_s == 7 * 24 * 3600 == storage.MAX_LINK_EXPIRY_S
    parser = build_parser()
    base = ["run", "m.csv", "--output", "o", "--model", "tiny", "--report-link-expiry-s"]
    assert settings_from(parser.parse_args(base + ["3600"])).report_link_expiry_s == 3600
    for bad in ("0", "604801"):
        with pytest.raises(ConfigError, match="report_link_expiry_s"):
            settings_from(parser.parse_args(base + [bad]))
