# Sourced by build.sh and make-base.sh: buildah on the vfs driver with chroot isolation, as
# root, the only way it works on a machine without a container engine. Needs die() defined.

export STORAGE_DRIVER="${STORAGE_DRIVER:-vfs}"
export BUILDAH_ISOLATION="${BUILDAH_ISOLATION:-chroot}"
# buildah 1.28 does not reliably honour $STORAGE_DRIVER by itself (it re-uses a "prior"
# driver found under /var/lib/containers/storage), so pass it explicitly.
buildah() { command buildah --storage-driver "$STORAGE_DRIVER" "$@"; }

[[ $EUID -eq 0 ]] || die "must run as root (buildah with vfs + chroot isolation, debootstrap)"
command -v buildah >/dev/null || die "buildah not found: apt-get install buildah debootstrap"
command -v debootstrap >/dev/null || die "debootstrap not found: apt-get install buildah debootstrap"
