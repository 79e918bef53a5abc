"""``ota-conformance-client``: the tuf-conformance client protocol on our fetcher.

Protocol (github.com/theupdateframework/tuf-conformance, CLIENT-CLI.md)::

    ota-conformance-client --metadata-dir D init ROOT
    ota-conformance-client --metadata-dir D --metadata-url U refresh
    ota-conformance-client --metadata-dir D --metadata-url U --target-name P [--target-name P2]
        --target-base-url U2 --target-dir D2 download

Exit 0 on success, 1 on any failure. Trust decisions are python-tuf's ``Updater``; network IO is
:class:`ota.client._fetch.TufFetcher` (the device's own fetcher). ``init`` stores the trusted
root as ``D/root.json`` without network access; later commands bootstrap from it (the protocol
makes that file the trust anchor) and python-tuf's cache of rotated roots.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from urllib import parse

from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.updater import Updater

from ._fetch import FetchConfig, TufFetcher, make_pool


def _updater(args: argparse.Namespace, with_targets: bool = False) -> Updater:
    cfg = FetchConfig(retries=0, connect_timeout=5.0, read_timeout=10.0)
    fetcher = TufFetcher(make_pool(cfg), cfg, max_seconds=30.0)
    root = (Path(args.metadata_dir) / "root.json").read_bytes()
    return Updater(
        args.metadata_dir,
        args.metadata_url,
        args.target_dir if with_targets else None,
        args.target_base_url if with_targets else None,
        fetcher=fetcher,
        config=UpdaterConfig(),
        bootstrap=root,
    )


def _download(args: argparse.Namespace) -> None:
    updater = _updater(args, with_targets=True)
    updater.refresh()
    for name in args.target_name or []:
        info = updater.get_targetinfo(name)
        if info is None:
            raise LookupError(f"target {name} not found")
        path = str(Path(args.target_dir) / parse.quote(name, ""))
        if updater.find_cached_target(info, path) is None:
            updater.download_target(info, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ota-conformance-client")
    parser.add_argument("--metadata-dir", required=True)
    parser.add_argument("--metadata-url")
    parser.add_argument("--target-name", action="append")
    parser.add_argument("--target-base-url")
    parser.add_argument("--target-dir")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)
    init_p = sub.add_parser("init")
    init_p.add_argument("trusted_root")
    sub.add_parser("refresh")
    sub.add_parser("download")
    args = parser.parse_args(argv)
    try:
        if args.command == "init":
            Path(args.metadata_dir).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(args.trusted_root, Path(args.metadata_dir) / "root.json")
        elif args.command == "refresh":
            if not args.metadata_url:
                parser.error("refresh needs --metadata-url")
            _updater(args).refresh()
        else:
            if not (args.metadata_url and args.target_base_url and args.target_dir):
                parser.error("download needs --metadata-url, --target-base-url, --target-dir")
            _download(args)
    except Exception as e:
        print(f"ota-conformance-client: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
