#!/usr/bin/env bash
# Repack onnxruntime-gpu for the lent GPU machine in pieces small enough to carry beside this
# repository (one device call carries at most 64 MiB, the working tree included: ~12 MiB).
#
#   first: .whl/ (the diffusers wheels) and .ortc/p0.. (the onnxruntime-gpu wheel cut in 60 MiB pieces)
#   bash bench/gpu_prepare_ort.sh                 # .ortc/ -> .ortx/p0..p3 (the wheel's contents, .tar.xz)
#
# The wheel's TensorRT provider library is dropped (TensorRT is not on the GPU machine) and the
# rest is xz-compressed: 350 MB -> 193 MiB, 4 pieces of <= 48.5 MiB. Then, on the device, four
# calls back to back (the machine stays warm ~30 s between calls and keeps /tmp):
#   carry .ortx/p0:  cat .ortx/p0 >  /tmp/ortx.tar.xz
#   carry .ortx/pN:  cat .ortx/pN >> /tmp/ortx.tar.xz        (N = 1, 2, 3)
# and `bash bench/gpu_session.sh all` unpacks /tmp/ortx.tar.xz into /tmp/site (what pip would).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
[ -f .ortc/p0 ] || { echo "no .ortc/ pieces: cut the onnxruntime-gpu wheel into .ortc/p0.. (60 MiB each) first" >&2; exit 2; }
grep -qxF /.ortx/ .git/info/exclude 2>/dev/null || echo /.ortx/ >> .git/info/exclude
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat .ortc/p? > "$tmp/ort.whl"
if [ -f .ortc/SHA256 ]; then
  echo "$(cat .ortc/SHA256)  $tmp/ort.whl" | sha256sum -c --quiet -
fi
mkdir "$tmp/x"
python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$tmp/ort.whl" "$tmp/x"
rm -f "$tmp"/x/onnxruntime/capi/libonnxruntime_providers_tensorrt.so
(cd "$tmp/x" && tar cf - . | xz -T0 -9e > "$tmp/ortx.tar.xz")
rm -rf .ortx && mkdir .ortx
split -b 50855936 -d -a 1 "$tmp/ortx.tar.xz" .ortx/p
sha256sum "$tmp/ortx.tar.xz" | cut -d' ' -f1 > .ortx/SHA256
ls -l .ortx
