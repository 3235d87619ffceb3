{{/*
The Triton pod, shared by the StatefulSet and the KServe predictor. Called with
(dict "ctx" $ "http" <port> "grpc" <port> "metrics" <port>).
*/}}

{{- define "rtinfer.keysDir" -}}/run/rtinfer/keys{{- end -}}
{{- define "rtinfer.repoDir" -}}/run/rtinfer/model_repository{{- end -}}
{{- define "rtinfer.scriptsDir" -}}/opt/rtinfer-chart{{- end -}}

{{/* Secrets copied into the key volume: list of [volume name, key, file name]. */}}
{{- define "rtinfer.keySecrets" -}}
{{- $s := .Values.secrets -}}
{{- $out := list (list "keyring" $s.keyring.secretName $s.keyring.key "keyring.json") (list "internal-key" $s.internalKey.secretName $s.internalKey.key "server-internal.key") -}}
{{- if $s.auditSigningKey.secretName -}}
{{- $out = append $out (list "audit-signing-key" $s.auditSigningKey.secretName $s.auditSigningKey.key "audit-signing.pem") -}}
{{- end -}}
{{- $redisSecret := include "rtinfer.replayPasswordSecret" . -}}
{{- if $redisSecret -}}
{{- $out = append $out (list "redis-password" $redisSecret (include "rtinfer.replayPasswordKey" .) "redis-password") -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{- define "rtinfer.tritonArgs" -}}
{{- $ctx := .ctx -}}
{{- $v := $ctx.Values.triton -}}
- --model-repository={{ include "rtinfer.repoDir" $ctx }}
- --model-control-mode=explicit
{{- range $v.loadModels }}
- --load-model={{ . }}
{{- end }}
- --http-port={{ .http }}
- --grpc-port={{ .grpc }}
- --metrics-port={{ .metrics }}
- --allow-metrics=true
- --log-verbose={{ $v.logVerbose }}
{{- if $v.modelConfigName }}
- --model-config-name={{ $v.modelConfigName }}
{{- end }}
{{- if $ctx.Values.secrets.apiKey.secretName }}
- --http-restricted-api=inference:x-api-key=$(RTINFER_API_KEY)
- --grpc-restricted-protocol=inference:x-api-key=$(RTINFER_API_KEY)
{{- end }}
{{- if $ctx.Values.secrets.adminKey.secretName }}
- --http-restricted-api=model-repository,shared-memory,statistics,trace,logging:x-admin-key=$(RTINFER_ADMIN_KEY)
- --grpc-restricted-protocol=model-repository,shared-memory,statistics,trace,logging:x-admin-key=$(RTINFER_ADMIN_KEY)
{{- end }}
{{- range $v.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{- define "rtinfer.tritonEnv" -}}
{{- $ctx := .ctx -}}
{{- $keys := include "rtinfer.keysDir" $ctx -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
# the replica id every audit record and checkpoint names: the pod's name (stable in a StatefulSet)
- name: RTINFER_REPLICA_ID
  value: $(POD_NAME)
- name: RTINFER_AUDIT_DIR
  value: {{ .auditDir }}/$(POD_NAME)
- name: RTINFER_KEYRING
  value: {{ $keys }}/keyring.json
- name: RTINFER_INTERNAL_KEY
  value: {{ $keys }}/server-internal.key
{{- if $ctx.Values.secrets.auditSigningKey.secretName }}
- name: RTINFER_AUDIT_SIGNING_KEY
  value: {{ $keys }}/audit-signing.pem
{{- end }}
{{- with include "rtinfer.replayStoreUrl" $ctx }}
- name: RTINFER_REPLAY_STORE
  value: {{ . | quote }}
{{- end }}
{{- if include "rtinfer.replayPasswordSecret" $ctx }}
- name: RTINFER_REDIS_PASSWORD_FILE
  value: {{ $keys }}/redis-password
{{- end }}
{{- if $ctx.Values.replayStore.caSecret.name }}
- name: RTINFER_REDIS_CA
  value: /run/rtinfer/redis-ca/{{ $ctx.Values.replayStore.caSecret.key }}
{{- end }}
{{- with .fleet }}
- name: RTINFER_FLEET_REPLICAS
  value: {{ . | quote }}
{{- end }}
{{- if $ctx.Values.secrets.apiKey.secretName }}
- name: RTINFER_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $ctx.Values.secrets.apiKey.secretName }}
      key: {{ $ctx.Values.secrets.apiKey.key }}
{{- end }}
{{- if $ctx.Values.secrets.adminKey.secretName }}
- name: RTINFER_ADMIN_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $ctx.Values.secrets.adminKey.secretName }}
      key: {{ $ctx.Values.secrets.adminKey.key }}
{{- end }}
{{- with $ctx.Values.triton.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "rtinfer.tritonMounts" -}}
{{- $ctx := .ctx -}}
- name: repository
  mountPath: {{ include "rtinfer.repoDir" $ctx }}
  readOnly: true
{{- if eq $ctx.Values.triton.modelRepository.source "volume" }}
- name: model-source
  mountPath: {{ $ctx.Values.triton.modelRepository.imagePath }}
  readOnly: true
  {{- with $ctx.Values.triton.modelRepository.subPath }}
  subPath: {{ . }}
  {{- end }}
{{- end }}
- name: keys
  mountPath: {{ include "rtinfer.keysDir" $ctx }}
  readOnly: true
- name: audit
  mountPath: {{ .auditDir }}
- name: shm
  mountPath: /dev/shm
- name: tmp
  mountPath: /tmp
{{- if $ctx.Values.replayStore.caSecret.name }}
- name: redis-ca
  mountPath: /run/rtinfer/redis-ca
  readOnly: true
{{- end }}
{{- end -}}

{{- define "rtinfer.tritonInitContainers" -}}
{{- $ctx := .ctx -}}
{{- $keys := include "rtinfer.keysDir" $ctx -}}
{{- $scripts := include "rtinfer.scriptsDir" $ctx -}}
# native sidecar: copies the Secrets to 0600 files and keeps them current (rotation without restart)
- name: key-sync
  image: {{ include "rtinfer.tritonImage" $ctx }}
  imagePullPolicy: {{ $ctx.Values.triton.image.pullPolicy }}
  restartPolicy: Always
  command:
    - python3
    - {{ $scripts }}/key_sync.py
    - --dst={{ $keys }}
    - --interval={{ $ctx.Values.triton.keySyncIntervalSeconds }}
    {{- range (include "rtinfer.keySecrets" $ctx | fromJsonArray) }}
    - /run/rtinfer/secrets/{{ index . 0 }}/{{ index . 2 }}={{ index . 3 }}
    {{- end }}
  startupProbe:
    exec:
      command: [test, -e, {{ $keys }}/.ready]
    periodSeconds: 1
    failureThreshold: 60
  resources:
    requests:
      cpu: 10m
      memory: 32Mi
    limits:
      cpu: 100m
      memory: 64Mi
  securityContext:
    {{- toYaml $ctx.Values.triton.securityContext | nindent 4 }}
  volumeMounts:
    - name: scripts
      mountPath: {{ $scripts }}
      readOnly: true
    - name: keys
      mountPath: {{ $keys }}
    {{- range (include "rtinfer.keySecrets" $ctx | fromJsonArray) }}
    - name: secret-{{ index . 0 }}
      mountPath: /run/rtinfer/secrets/{{ index . 0 }}
      readOnly: true
    {{- end }}
- name: prepare-repository
  image: {{ include "rtinfer.tritonImage" $ctx }}
  imagePullPolicy: {{ $ctx.Values.triton.image.pullPolicy }}
  command:
    - python3
    - {{ $scripts }}/prepare_repository.py
    - {{ $ctx.Values.triton.modelRepository.imagePath }}
    - {{ include "rtinfer.repoDir" $ctx }}
    - {{ include "rtinfer.modelParameters" $ctx | quote }}
  resources:
    requests:
      cpu: 10m
      memory: 32Mi
    limits:
      cpu: 500m
      memory: 128Mi
  securityContext:
    {{- toYaml $ctx.Values.triton.securityContext | nindent 4 }}
  volumeMounts:
    - name: scripts
      mountPath: {{ $scripts }}
      readOnly: true
    - name: repository
      mountPath: {{ include "rtinfer.repoDir" $ctx }}
    {{- if eq $ctx.Values.triton.modelRepository.source "volume" }}
    - name: model-source
      mountPath: {{ $ctx.Values.triton.modelRepository.imagePath }}
      readOnly: true
      {{- with $ctx.Values.triton.modelRepository.subPath }}
      subPath: {{ . }}
      {{- end }}
    {{- end }}
{{- end -}}

{{- define "rtinfer.tritonVolumes" -}}
{{- $ctx := .ctx -}}
- name: scripts
  configMap:
    name: {{ include "rtinfer.tritonName" $ctx }}-scripts
    defaultMode: 292  # 0444
- name: keys
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
- name: repository
  emptyDir:
    sizeLimit: 64Mi
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ $ctx.Values.triton.shmSize }}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
{{- range (include "rtinfer.keySecrets" $ctx | fromJsonArray) }}
- name: secret-{{ index . 0 }}
  secret:
    secretName: {{ index . 1 }}
    defaultMode: {{ $ctx.Values.secrets.defaultMode }}
    items:
      - key: {{ index . 2 }}
        path: {{ index . 2 }}
{{- end }}
{{- if $ctx.Values.replayStore.caSecret.name }}
- name: redis-ca
  secret:
    secretName: {{ $ctx.Values.replayStore.caSecret.name }}
    defaultMode: 292  # 0444: a CA certificate is public
    items:
      - key: {{ $ctx.Values.replayStore.caSecret.key }}
        path: {{ $ctx.Values.replayStore.caSecret.key }}
{{- end }}
{{- if eq $ctx.Values.triton.modelRepository.source "volume" }}
- name: model-source
  persistentVolumeClaim:
    claimName: {{ $ctx.Values.triton.modelRepository.claimName }}
    readOnly: true
{{- end }}
{{- end -}}

{{- define "rtinfer.tritonResources" -}}
{{- $r := deepCopy .Values.triton.resources -}}
{{- if gt (int .Values.triton.gpus) 0 -}}
{{- $limits := get $r "limits" | default dict -}}
{{- $_ := set $limits "nvidia.com/gpu" (int .Values.triton.gpus) -}}
{{- $_ := set $r "limits" $limits -}}
{{- $requests := get $r "requests" | default dict -}}
{{- $_ := set $requests "nvidia.com/gpu" (int .Values.triton.gpus) -}}
{{- $_ := set $r "requests" $requests -}}
{{- end -}}
{{- toYaml $r -}}
{{- end -}}

{{- define "rtinfer.tritonProbes" -}}
{{- $v := .ctx.Values.triton -}}
startupProbe:
  httpGet:
    path: /v2/health/ready
    port: {{ .http }}
  periodSeconds: {{ $v.startupProbe.periodSeconds }}
  failureThreshold: {{ $v.startupProbe.failureThreshold }}
  timeoutSeconds: {{ $v.startupProbe.timeoutSeconds }}
readinessProbe:
  httpGet:
    path: /v2/health/ready
    port: {{ .http }}
  periodSeconds: {{ $v.readinessProbe.periodSeconds }}
  failureThreshold: {{ $v.readinessProbe.failureThreshold }}
  timeoutSeconds: {{ $v.readinessProbe.timeoutSeconds }}
livenessProbe:
  httpGet:
    path: /v2/health/live
    port: {{ .http }}
  periodSeconds: {{ $v.livenessProbe.periodSeconds }}
  failureThreshold: {{ $v.livenessProbe.failureThreshold }}
  timeoutSeconds: {{ $v.livenessProbe.timeoutSeconds }}
lifecycle:
  preStop:
    exec:
      command: [sleep, {{ $v.preStopSleepSeconds | quote }}]
{{- end -}}
