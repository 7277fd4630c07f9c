# Local path: the same image as deploy/Dockerfile, assembled by
# deploy/build-images.sh from binaries built on this host and the shared
# libraries they link (FROM scratch needs no registry).
FROM scratch
COPY rootfs/ /
# The shards' checkpoint directory (a named volume in compose takes its owner).
COPY --chown=10001:10001 state/ /var/lib/paramserver/
# Where shards put their local-channel sockets (a volume shared with co-located workers).
COPY --chown=10001:10001 state/ /run/paramserver/
ENV PATH=/usr/local/bin
USER 10001:10001
EXPOSE 50051 9100 9101
HEALTHCHECK --interval=5s --timeout=3s --retries=5 CMD ["ctl", "health", "--metrics", "127.0.0.1:9100,127.0.0.1:9101"]
CMD ["server"]
