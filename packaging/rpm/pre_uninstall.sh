# tidemark (rpm) %preun: on erase (not upgrade), stop and disable the units.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl --no-reload disable --now tidemark-shipper.service \
        tidemark-tracker.service tidemark-receiver.service >/dev/null 2>&1 || :
fi
