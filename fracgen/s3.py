"""s3:// folders: any S3-compatible object store (AWS S3, MinIO, Ceph, R2), through boto3 (the `s3` extra).

Why boto3 and not fsspec/s3fs: we need three things of a store (sign a GET, upload a file, read the standard AWS
credential chain and `AWS_ENDPOINT_URL`), and boto3 is the store's own SDK that does exactly those; s3fs adds an
async filesystem layer (aiobotocore) whose reads we would have to bound all over again.

Reading does not go through boto3's own HTTP stack: each file is fetched from a presigned URL (signed here, with the
credentials boto3 finds) by fracgen's one downloader (`fracgen.share`), so an s3:// source gets every rule an
http(s) one has: sizes and sha256 from the manifest, `--timeout`, `--min-rate`, `--deadline`, retries said in notes,
hidden temporaries. The signed URL carries the signature in its query and is never shown: messages name
`s3://BUCKET/KEY`. Uploads use boto3's managed transfer (multipart, its standard retry mode).

Credentials: the standard chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE,
~/.aws/credentials and config, instance roles); the endpoint: AWS_ENDPOINT_URL (path-style addressing then, which
MinIO and Ceph need); the region: AWS_DEFAULT_REGION or the profile's, else us-east-1.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from fracgen.errors import FracgenError
from fracgen.untrusted import printable

PATTERN = re.compile(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?")
EXPIRES = 3600  # seconds a signed URL stays valid: longer than a file's --deadline (900 s by default)
HINTS = {"NoSuchBucket": "no such bucket", "NoSuchKey": "no such object",
         "AccessDenied": "access denied: the AWS credentials do not allow it",
         "InvalidAccessKeyId": "the AWS access key is not known to this store",
         "SignatureDoesNotMatch": "the AWS secret key does not match the access key",
         "PermanentRedirect": "the bucket is in another region: set AWS_DEFAULT_REGION to it"}


def parse(spec: str) -> tuple[str, str]:
    """(bucket, prefix) of s3://BUCKET[/PREFIX]; the prefix is '' or ends in '/' (a folder)."""
    match = PATTERN.fullmatch(spec)
    if not match:
        raise FracgenError(f"{spec!r} is not s3://BUCKET/PREFIX/ (a bucket name: 3-63 lower-case letters, digits, "
                           "'.' and '-')")
    prefix = match.group(2) or ""
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return match.group(1), prefix


def _boto3():
    try:
        import boto3
        import botocore
    except ImportError:
        raise FracgenError("s3:// needs boto3: pip install 'fracgen[s3]' (or boto3)") from None
    return boto3, botocore


IDENTITY = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
            "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
            "AWS_DEFAULT_REGION", "AWS_REGION")  # what the client depends on (its cache key; never shown)


def _check_endpoint(name: str, endpoint: str) -> None:
    """An endpoint URL boto3 can use, or one line naming the variable: boto3 and urllib answered "not a url",
    "http://", "ftp://x" or "http://[::1" with 65 to 83 lines of traceback."""
    try:
        parts = urlsplit(endpoint)
        fine = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a bracket left open; a port out of range or not a number (.port raises)
        fine = False
    if not fine or any(ch.isspace() or not ch.isprintable() for ch in endpoint):
        raise FracgenError(f"{name} '{printable(endpoint)}' is not the http(s) URL of an S3 endpoint (like "
                           "http://127.0.0.1:9000): correct it, or unset it for AWS itself")


@lru_cache(maxsize=4)
def _client(environment: tuple):
    """A client per environment (credentials, endpoint, region): a pull signs one URL per shard with the same one."""
    boto3, botocore = _boto3()
    from botocore.config import Config

    env = dict(zip(IDENTITY, environment, strict=True))
    name = "AWS_ENDPOINT_URL_S3" if env["AWS_ENDPOINT_URL_S3"] else "AWS_ENDPOINT_URL"
    endpoint = env[name] or None
    if endpoint:
        _check_endpoint(name, endpoint)
    config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=30, read_timeout=30,
                    signature_version="s3v4", s3={"addressing_style": "path" if endpoint else "auto"})
    session = boto3.session.Session()
    region = env["AWS_DEFAULT_REGION"] or env["AWS_REGION"] or session.region_name or "us-east-1"
    try:
        return session, session.client("s3", endpoint_url=endpoint, region_name=region, config=config)
    except (ValueError, botocore.exceptions.BotoCoreError) as e:  # an endpoint_url or region in ~/.aws/config
        raise FracgenError(f"the S3 client cannot be made: {printable(e)[:200]} (check AWS_ENDPOINT_URL, "
                           "AWS_DEFAULT_REGION and ~/.aws/config)") from None


def client():
    """An S3 client for this environment (endpoint, region and credentials as the module docstring says)."""
    return _client(tuple(os.environ.get(k) for k in IDENTITY))[1]


def check_credentials(spec: str) -> None:
    """One line, before any work, when no credentials can be found."""
    _, botocore = _boto3()
    try:
        credentials = _client(tuple(os.environ.get(k) for k in IDENTITY))[0].get_credentials()
    except botocore.exceptions.BotoCoreError as e:
        raise FracgenError(f"{spec}: {e}") from None
    if credentials is None:
        raise FracgenError(f"{spec}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                           "AWS_PROFILE, or write ~/.aws/credentials)")


def presign(bucket: str, key: str) -> str:
    """A GET URL for s3://bucket/key, signed here (no request is made)."""
    check_credentials(f"s3://{bucket}/{key}")
    _, botocore = _boto3()
    try:
        return client().generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                               ExpiresIn=EXPIRES)
    except botocore.exceptions.BotoCoreError as e:  # the endpoint rules' refusals (EndpointResolutionError)
        raise FracgenError(f"s3://{bucket}/{key}: {printable(e)[:200]}") from None


def error_hint(body: bytes) -> str:
    """What an S3 error document (<Error><Code>...) says, in a few words; '' when it says nothing we know."""
    match = re.search(rb"<Code>([A-Za-z]{1,64})</Code>", body[:4096])
    return HINTS.get(match.group(1).decode(), match.group(1).decode()) if match else ""


def upload(folder: Path, files: list[str], to: str, note=None) -> str:
    """Put `files` of `folder` under s3://BUCKET/PREFIX/, in the order given (so a reader finds the manifest only
    once the shards are there: the caller lists it last); returns the destination's s3:// URL."""
    bucket, prefix = parse(to)
    check_credentials(to)
    s3 = client()
    for name in files:
        key = prefix + name
        try:
            s3.upload_file(str(Path(folder) / name), bucket, key)
        except Exception as e:  # boto3 wraps the store's refusals in S3UploadFailedError: each is one line
            text = str(e)
            code = next((c for c in HINTS if c in text), "")
            reason = HINTS.get(code) or (text.splitlines() or [type(e).__name__])[0][:200]
            raise FracgenError(f"upload of s3://{bucket}/{key} failed: {reason}") from None
        if note:
            note(f"uploaded s3://{bucket}/{key}")
    return f"s3://{bucket}/{prefix}"
