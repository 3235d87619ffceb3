{{/*
Kubernetes' replicas.cfg: deploy/gateway/haproxy.cfg is used unchanged and takes its backends from a
second file (haproxy -f haproxy.cfg -f <backends>), as rtinfer/launch/gateway.py writes one per fleet on
one host. Here the servers are the Triton pods: server-template slots filled from DNS (the headless
Service lists the ready pods), each request balanced by the policy of haproxy.cfg's "defaults
replicas" (leastconn per request, health checks on /v2/health/ready, a request re-sent only when
the connection failed before anything was sent: never a replay). The gRPC servers check the same
HTTP health endpoint themselves (a slot of one backend need not be the same pod as the same slot
of the other, so they cannot track each other). Triton's /metrics is per pod and scraped there:
the gateway answers 404 for it, and has no replica_<id> backends.
Called with (dict "ctx" $ "host" <DNS name> "http" <port> "grpc" <port> "slots" <n>).
*/}}
{{- define "rtinfer.gatewayKubernetesCfg" -}}
# rtinfer gateway on Kubernetes: the backends of deploy/gateway/haproxy.cfg (rendered by the rtinfer chart).
resolvers kube
    parse-resolv-conf
    accepted_payload_size 8192
    resolve_retries 3
    timeout resolve 1s
    timeout retry 1s
    hold valid {{ .ctx.Values.gateway.dnsHoldValid }}
    hold obsolete {{ .ctx.Values.gateway.dnsHoldValid }}

backend triton_http from replicas
    default-server init-addr none resolvers kube resolve-prefer ipv4
    server-template triton {{ .slots }} {{ .host }}:{{ .http }} check

backend triton_grpc from replicas
    default-server init-addr none resolvers kube resolve-prefer ipv4
    server-template triton {{ .slots }} {{ .host }}:{{ .grpc }} proto h2 check port {{ .http }} check-proto h1

backend triton_metrics
    http-request return status 404 content-type text/plain string "scrape Triton's metrics from each pod (port {{ .ctx.Values.triton.ports.metrics }}), not through the gateway"
{{- end -}}

{{/* The gateway container (Deployment and KServe transformer). Called with (dict "ctx" $ "http" <port>). */}}
{{- define "rtinfer.gatewayContainer" -}}
{{- $ctx := .ctx -}}
{{- $g := $ctx.Values.gateway -}}
- name: {{ .name | default "gateway" }}
  image: {{ include "rtinfer.gatewayImage" $ctx }}
  imagePullPolicy: {{ $g.image.pullPolicy }}
  # sh -c: arguments a platform appends (KServe gives transformers --model_name, --predictor_host)
  # become ignored positional parameters instead of HAProxy options
  command:
    - /bin/sh
    - -c
    - exec haproxy -db -f /etc/rtinfer/gateway/haproxy.cfg -f /etc/rtinfer/gateway/kubernetes.cfg
    - gateway
  env:
    - name: GW_DIR
      value: /etc/rtinfer/gateway
    - name: GW_MODEL
      value: {{ join "," $g.models | quote }}
    - name: GW_HTTP_BIND
      value: ":{{ .http }}"
    - name: GW_GRPC_BIND
      value: ":{{ $g.ports.grpc }}"
    - name: GW_METRICS_BIND
      value: ":{{ $g.ports.metrics }}"
    # HAProxy's runtime API inside the pod (kubectl exec ... socat): show servers state, drain a slot
    - name: GW_STATS_SOCKET
      value: /run/haproxy/admin.sock
    {{- if $g.tls.secretName }}
    - name: GW_TLS_PEM
      value: /run/rtinfer/gateway-tls/{{ $g.tls.key }}
    {{- end }}
    {{- if $g.tls.clientCaSecretName }}
    - name: GW_TLS_CLIENT_CA
      value: /run/rtinfer/gateway-client-ca/{{ $g.tls.clientCaKey }}
    {{- end }}
    {{- if $ctx.Values.secrets.apiKeyDigests.secretName }}
    - name: GW_API_KEYS
      value: /run/rtinfer/gateway-api-keys/{{ $ctx.Values.secrets.apiKeyDigests.key }}
    {{- end }}
    {{- if gt (int $g.rateLimit) 0 }}
    - name: GW_RATE_LIMIT
      value: {{ $g.rateLimit | quote }}
    {{- end }}
  ports:
    - name: http
      containerPort: {{ .http }}
    - name: grpc
      containerPort: {{ $g.ports.grpc }}
    - name: metrics
      containerPort: {{ $g.ports.metrics }}
  # ready when it can reach a ready Triton pod (through its own policy: /v2/health/ready is open);
  # with mutual TLS the kubelet has no client certificate: ready when it listens
  readinessProbe:
    {{- if $g.tls.clientCaSecretName }}
    tcpSocket:
      port: {{ .http }}
    {{- else }}
    httpGet:
      path: /v2/health/ready
      port: {{ .http }}
      {{- if $g.tls.secretName }}
      scheme: HTTPS
      {{- end }}
    {{- end }}
    periodSeconds: 5
    failureThreshold: 2
    timeoutSeconds: 2
  # alive while it listens, whatever the state of Triton
  livenessProbe:
    tcpSocket:
      port: {{ .http }}
    periodSeconds: 10
    failureThreshold: 3
  resources:
    {{- toYaml $g.resources | nindent 4 }}
  securityContext:
    {{- toYaml $g.securityContext | nindent 4 }}
  volumeMounts:
    - name: config
      mountPath: /etc/rtinfer/gateway
      readOnly: true
    - name: run
      mountPath: /run/haproxy
    {{- if $g.tls.secretName }}
    - name: tls
      mountPath: /run/rtinfer/gateway-tls
      readOnly: true
    {{- end }}
    {{- if $g.tls.clientCaSecretName }}
    - name: client-ca
      mountPath: /run/rtinfer/gateway-client-ca
      readOnly: true
    {{- end }}
    {{- if $ctx.Values.secrets.apiKeyDigests.secretName }}
    - name: api-keys
      mountPath: /run/rtinfer/gateway-api-keys
      readOnly: true
    {{- end }}
{{- end -}}

{{- define "rtinfer.gatewayVolumes" -}}
{{- $ctx := .ctx -}}
{{- $g := $ctx.Values.gateway -}}
- name: config
  configMap:
    name: {{ .configMap }}
    defaultMode: 292  # 0444
- name: run
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- if $g.tls.secretName }}
- name: tls
  secret:
    secretName: {{ $g.tls.secretName }}
    defaultMode: {{ $ctx.Values.secrets.defaultMode }}
{{- end }}
{{- if $g.tls.clientCaSecretName }}
- name: client-ca
  secret:
    secretName: {{ $g.tls.clientCaSecretName }}
    defaultMode: 292
{{- end }}
{{- if $ctx.Values.secrets.apiKeyDigests.secretName }}
- name: api-keys
  secret:
    secretName: {{ $ctx.Values.secrets.apiKeyDigests.secretName }}
    defaultMode: {{ $ctx.Values.secrets.defaultMode }}
{{- end }}
{{- end -}}

{{/* The KServe variant's backends: the predictor's Service (one ClusterIP, HTTP only). */}}
{{- define "rtinfer.gatewayKserveCfg" -}}
# rtinfer gateway as a KServe transformer: the backends of deploy/gateway/haproxy.cfg (rendered by the rtinfer chart).
# The predictor's Service is one ClusterIP (kube-proxy balances connections, not requests).
resolvers kube
    parse-resolv-conf
    hold valid {{ .ctx.Values.gateway.dnsHoldValid }}

backend triton_http from replicas
    default-server init-addr none resolvers kube resolve-prefer ipv4
    server-template predictor 1 {{ .host }}:80 check

# KServe routes one port to the predictor: gRPC is not served in this variant (UNAVAILABLE).
backend triton_grpc
    http-request return status 200 content-type application/grpc hdr grpc-status 14 hdr grpc-message "gateway: gRPC is not served in the KServe variant"

backend triton_metrics
    http-request return status 404 content-type text/plain string "scrape Triton's metrics from each pod (port {{ .ctx.Values.triton.ports.metrics }}), not through the gateway"
{{- end -}}
