"""Result files on object storage (a local S3 endpoint) and on ``file://`` URIs."""

from __future__ import annotations

import uuid

import pytest

from workers import result_files

RESULT = {"status": "done", "metrics": {"perplexity": {"value": 3.5}}}


def test_uri_join_puts_the_path_before_the_query():
    assert result_files.uri_join("s3://b/tune?region=x&scheme=http", "results", "db/") == (
        "s3://b/tune/results/db?region=x&scheme=http")
    assert result_files.uri_join("s3://b/", "a") == "s3://b/a"
    assert result_files.is_uri("s3://b/a") and not result_files.is_uri("/tmp/a")


def test_written_read_listed_and_removed_on_s3(s3):
    directory = s3.uri(f"results/{uuid.uuid4().hex}")
    key = "a" * 64
    where = result_files.write(directory, key, RESULT)
    assert where == result_files.uri_join(directory, key + ".json")
    assert result_files.read(directory, key) == RESULT
    prefix = directory.split("?")[0].removeprefix(f"s3://{s3.bucket}/")
    # Only the result itself is left (and pyarrow's directory marker): the temporary
    # object was moved into place.
    assert [k for k in s3.keys(prefix) if not k.endswith("/")] == [f"{prefix}/{key}.json"]

    result_files.write(directory, "b" * 64, dict(RESULT, status="failed"))
    assert set(result_files.read_all(directory)) == {key, "b" * 64}
    result_files.remove(directory, key)
    result_files.remove(directory, key)  # already gone: no error
    assert set(result_files.read_all(directory)) == {"b" * 64}
    assert result_files.read(directory, key) is None


def test_broken_and_missing_objects_are_skipped(s3):
    import boto3
    from s3_server import _boto_credentials

    directory = s3.uri(f"results/{uuid.uuid4().hex}")
    assert result_files.read_all(directory) == {}  # nothing written there yet
    prefix = directory.split("?")[0].removeprefix(f"s3://{s3.bucket}/")
    boto3.client("s3", endpoint_url=s3.endpoint, **_boto_credentials()).put_object(
        Bucket=s3.bucket, Key=f"{prefix}/broken.json", Body=b"{not json")
    result_files.write(directory, "c" * 64, RESULT)
    assert result_files.read_all(directory) == {"c" * 64: RESULT}


def test_file_uris_work_like_directories(tmp_path):
    directory = f"file://{tmp_path}/r"
    result_files.write(directory, "d" * 64, RESULT)
    assert (tmp_path / "r" / ("d" * 64 + ".json")).is_file()
    assert result_files.read_all(directory) == {"d" * 64: RESULT}
    assert result_files.read_all(tmp_path / "r") == {"d" * 64: RESULT}
    result_files.remove(directory, "d" * 64)
    assert not list((tmp_path / "r").iterdir())


@pytest.mark.parametrize("uri", ["s3://b/x?bogus=1&region=us-east-1", "nosuch://bucket/x"])
def test_launch_refuses_a_uri_pyarrow_cannot_open(uri):
    from orchestrator.errors import BadInput
    from orchestrator.launch import check_storage_uri

    with pytest.raises(BadInput, match=r"^--storage-path .*: .*give a directory, or a URI"):
        check_storage_uri(uri)
