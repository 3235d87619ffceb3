{{/* Names and labels (conventions of Triton's deploy/k8s-onprem chart and `helm create`). */}}
{{- define "rtinfer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "rtinfer.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "rtinfer.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "rtinfer.labels" -}}
helm.sh/chart: {{ include "rtinfer.chart" . }}
app.kubernetes.io/name: {{ include "rtinfer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: include "rtinfer.selector" (list . "triton") */}}
{{- define "rtinfer.selector" -}}
{{- $ctx := index . 0 -}}
app.kubernetes.io/name: {{ include "rtinfer.name" $ctx }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "rtinfer.tritonName" -}}{{ include "rtinfer.fullname" . }}-triton{{- end -}}
{{- define "rtinfer.gatewayName" -}}{{ include "rtinfer.fullname" . }}-gateway{{- end -}}
{{- define "rtinfer.redisName" -}}{{ include "rtinfer.fullname" . }}-redis{{- end -}}

{{- define "rtinfer.tritonImage" -}}
{{- $tag := .Values.triton.image.tag | default (printf "%s-py3-rtinfer%s" .Values.triton.nvcrTag .Chart.AppVersion) -}}
{{- printf "%s:%s" .Values.triton.image.repository $tag -}}
{{- end -}}

{{- define "rtinfer.gatewayImage" -}}
{{- printf "%s:%s" .Values.gateway.image.repository (.Values.gateway.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* The largest number of Triton pods the chart can run: the gateway's server-template slots. */}}
{{- define "rtinfer.backendSlots" -}}
{{- if .Values.gateway.backendSlots -}}
{{- .Values.gateway.backendSlots -}}
{{- else if .Values.autoscaling.enabled -}}
{{- max .Values.autoscaling.maxReplicas .Values.triton.replicas -}}
{{- else -}}
{{- .Values.triton.replicas -}}
{{- end -}}
{{- end -}}

{{/* Several pods? (autoscaling may add them) */}}
{{- define "rtinfer.multiPod" -}}
{{- if .Values.kserve.enabled -}}
{{- if or (gt (int .Values.kserve.maxReplicas) 1) (gt (int .Values.kserve.minReplicas) 1) -}}true{{- end -}}
{{- else if .Values.autoscaling.enabled -}}
{{- if gt (int .Values.autoscaling.maxReplicas) 1 -}}true{{- end -}}
{{- else if gt (int .Values.triton.replicas) 1 -}}true{{- end -}}
{{- end -}}

{{/* The replay store URL the stages get ("" = their SQLite default). */}}
{{- define "rtinfer.replayStoreUrl" -}}
{{- if .Values.replayStore.url -}}
{{- .Values.replayStore.url -}}
{{- else if .Values.redis.enabled -}}
{{- printf "redis://%s@%s.%s.svc.%s:%d/0" .Values.redis.user (include "rtinfer.redisName" .) .Release.Namespace .Values.clusterDomain (int .Values.redis.port) -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the Redis password the stages use. */}}
{{- define "rtinfer.replayPasswordSecret" -}}
{{- if .Values.replayStore.url -}}
{{- .Values.replayStore.passwordSecret.name -}}
{{- else if .Values.redis.enabled -}}
{{- .Values.redis.passwordSecret.name -}}
{{- end -}}
{{- end -}}

{{- define "rtinfer.replayPasswordKey" -}}
{{- if .Values.replayStore.url -}}{{ .Values.replayStore.passwordSecret.key }}{{- else -}}{{ .Values.redis.passwordSecret.key }}{{- end -}}
{{- end -}}

{{/* Model parameters applied in the pod, as JSON. */}}
{{- define "rtinfer.modelParameters" -}}
{{- toJson (.Values.triton.modelParameters | default dict) -}}
{{- end -}}

{{/* RTINFER_FLEET_REPLICAS: the pods' names when their number is fixed (checkpoints then name every
chain, and a fleet verify notices one that is missing); unset under an HPA, whose count changes. */}}
{{- define "rtinfer.fleetReplicas" -}}
{{- if not .Values.autoscaling.enabled -}}
{{- $ids := list -}}
{{- range $i := until (int .Values.triton.replicas) -}}
{{- $ids = append $ids (printf "%s-%d" (include "rtinfer.tritonName" $) $i) -}}
{{- end -}}
{{- join "," $ids -}}
{{- end -}}
{{- end -}}

{{/* Checks that stop a release that would not do what it says. */}}
{{- define "rtinfer.validate" -}}
{{- if and (include "rtinfer.multiPod" .) (not (include "rtinfer.replayStoreUrl" .)) (not .Values.replayStore.allowPerPodSqlite) -}}
{{- fail "several Triton pods need a shared replay store: set redis.enabled=true or replayStore.url (replayStore.allowPerPodSqlite=true accepts per-pod replay protection only)" -}}
{{- end -}}
{{- range .Values.gateway.models -}}
{{- if not (has . $.Values.triton.loadModels) -}}
{{- fail (printf "gateway.models names %s, which triton.loadModels does not load" .) -}}
{{- end -}}
{{- end -}}
{{- if and (eq .Values.triton.modelRepository.source "volume") (not .Values.triton.modelRepository.claimName) -}}
{{- fail "triton.modelRepository.source=volume needs triton.modelRepository.claimName" -}}
{{- end -}}
{{- if not (has .Values.triton.modelRepository.source (list "image" "volume")) -}}
{{- fail "triton.modelRepository.source must be image or volume" -}}
{{- end -}}
{{- if and .Values.secrets.apiKey.secretName (not .Values.secrets.apiKeyDigests.secretName) -}}
{{- fail "secrets.apiKey without secrets.apiKeyDigests: the gateway would pass requests without a key to Triton, which refuses them unlogged; give the gateway the digests too" -}}
{{- end -}}
{{- if and .Values.redis.enabled .Values.replayStore.url -}}
{{- fail "redis.enabled and replayStore.url both set: choose the in-chart Redis or an external one" -}}
{{- end -}}
{{- if and .Values.kserve.enabled (not .Values.kserve.auditClaimName) -}}
{{- fail "kserve.enabled needs kserve.auditClaimName (a ReadWriteMany claim for the per-pod audit chains)" -}}
{{- end -}}
{{- end -}}
