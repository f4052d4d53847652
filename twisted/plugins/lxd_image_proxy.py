"""The twistd drop-in: C{twistd lxd-image-proxy} (proxy.tap is imported only when used)."""

from twisted.application.service import ServiceMaker

lxd_image_proxy = ServiceMaker(
    "lxd-image-proxy",
    "proxy.tap",
    "Caching pull-through proxy for LXD and Incus images.",
    "lxd-image-proxy",
)
