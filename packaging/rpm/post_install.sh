# tidemark (rpm) %post: the `tidemark` user (the receiver runs as it) and
# the state directories. Units are left disabled, as Fedora/RHEL presets do
# for new services: enable the ones this host needs.
getent group tidemark >/dev/null || groupadd --system tidemark
getent passwd tidemark >/dev/null || useradd --system --gid tidemark \
    --home-dir /var/lib/tidemark --no-create-home --shell /sbin/nologin \
    --comment "Tidemark disaster recovery" tidemark
install -d -m 0755 /var/lib/tidemark
install -d -m 0700 /var/lib/tidemark/log
install -d -m 0750 -o tidemark -g tidemark /var/lib/tidemark/replicas
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
