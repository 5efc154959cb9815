"""Write a one-layer OCI image archive holding one static binary, for `ctr images import`.

    python3 oci_image.py OUT.tar BINARY NAME=[ARG,...] [NAME=...]

Every NAME (a full reference such as bulkhead.local/pause:1) becomes an image of the same
layer whose entrypoint is the binary with those arguments (none after a bare `=`). The archive is byte-for-byte reproducible: fixed times, owners
and order. The binary is /bulkhead-netprobe in the image, owned by root and run as 65534.
"""

import hashlib
import io
import json
import sys
import tarfile

USER = "65534:65534"
PATH_IN_IMAGE = "bulkhead-netprobe"


def blob(data):
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def layer_of(binary_path):
    buf = io.BytesIO()
    with open(binary_path, "rb") as f:
        content = f.read()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind in (("dev", tarfile.DIRTYPE), ("etc", tarfile.DIRTYPE), ("tmp", tarfile.DIRTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = 0o1777 if name == "tmp" else 0o755
            info.mtime = 0
            tar.addfile(info)
        passwd = b"root:x:0:0:root:/:/bulkhead-netprobe\nnobody:x:65534:65534:nobody:/:/bulkhead-netprobe\n"
        for name, data, mode in (
            ("etc/passwd", passwd, 0o644),
            ("etc/group", b"root:x:0:\nnogroup:x:65534:\n", 0o644),
            (PATH_IN_IMAGE, content, 0o755),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def dumps(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def main(argv):
    if len(argv) < 4:
        sys.exit(__doc__)
    out, binary, images = argv[1], argv[2], argv[3:]
    layer_digest, layer = blob(layer_of(binary))
    blobs = {layer_digest: layer}
    manifests = []
    for spec in images:
        name, sep, entry = spec.partition("=")
        if not sep or not name:
            sys.exit(f"bad image spec {spec!r}: want NAME=[ARG,...]")
        entrypoint = ["/" + PATH_IN_IMAGE] + (entry.split(",") if entry else [])
        config_digest, config = blob(dumps({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": entrypoint, "User": USER, "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }))
        manifest_digest, manifest = blob(dumps({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": len(layer),
            }],
        }))
        blobs[config_digest] = config
        blobs[manifest_digest] = manifest
        manifests.append({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": len(manifest),
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": name,
            },
        })
    files = {
        "oci-layout": dumps({"imageLayoutVersion": "1.0.0"}),
        "index.json": dumps({"schemaVersion": 2, "manifests": manifests}),
    }
    for digest, data in sorted(blobs.items()):
        files["blobs/sha256/" + digest.split(":", 1)[1]] = data
    with tarfile.open(out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(files[name]))


if __name__ == "__main__":
    main(sys.argv)
