#!/usr/bin/env sh
# Run a command (a local Ray cluster, the fleet service, the walkthrough) in a network namespace of its
# own whose only interface is loopback. Ray 2.60 binds its internal gRPC ports on every interface,
# whatever node address it is given; inside this namespace every interface is loopback, so nothing
# it opens can be reached from another host, or from this host's own network namespace either.
#
#     sh cluster/loopback_only.sh bash serve_configs/walkthrough.sh
#
# Needs unprivileged user namespaces (`unshare -rn`) and iproute2's `ip`. The service is then reachable
# from inside the namespace only: run the clients there too, or use a firewall instead.
set -eu
[ "$#" -gt 0 ] || { echo "usage: $0 COMMAND [ARG...]" >&2; exit 2; }
exec unshare --map-root-user --net sh -c 'ip link set lo up && exec "$@"' loopback_only "$@"
