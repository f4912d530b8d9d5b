{{/* Names, labels, and the checks every render runs. */}}

{{- define "presence-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "presence-gateway.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "presence-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "presence-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "presence-gateway.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "presence-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: presence-gateway
{{- end -}}

{{- define "presence-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "presence-gateway.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "presence-gateway.secretName" -}}
{{- default (include "presence-gateway.fullname" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "presence-gateway.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
What the schema cannot say: settings that only make sense together. configmap.yaml includes
this, so `helm install` and `helm template` stop before anything is applied.
*/}}
{{- define "presence-gateway.checks" -}}
{{- $c := .Values.config -}}
{{- $s := .Values.secrets -}}
{{- if and .Values.redis.url .Values.redis.cluster -}}
{{- fail "set redis.url or redis.cluster, not both" -}}
{{- end -}}
{{- if not (or .Values.redis.url .Values.redis.cluster $s.existingSecret) -}}
{{- fail "set redis.url (redis://host:port) or redis.cluster (host:port seeds): gateway pods share presence through Redis (or put redis-url in secrets.existingSecret)" -}}
{{- end -}}
{{- if not (or $s.apiKey $s.existingSecret) -}}
{{- fail "set secrets.apiKey (the REST API's key) or secrets.existingSecret" -}}
{{- end -}}
{{- if and (or $c.webhookUrls $c.authHookUrl) (not (or $s.webhookSecret $s.existingSecret)) -}}
{{- fail "config.webhookUrls and config.authHookUrl need secrets.webhookSecret (they are signed with it)" -}}
{{- end -}}
{{- $flush := 5 -}}
{{- if lt (int $c.shutdownGraceSecs) (add $c.drainDelaySecs $c.drainSpreadSecs $flush | int) -}}
{{- fail (printf "config.shutdownGraceSecs (%d) must be at least drainDelaySecs + drainSpreadSecs + %d s to flush (%d)" (int $c.shutdownGraceSecs) $flush (add $c.drainDelaySecs $c.drainSpreadSecs $flush | int)) -}}
{{- end -}}
{{- if lt (int .Values.terminationGracePeriodSeconds) (add $c.shutdownGraceSecs 5 | int) -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least config.shutdownGraceSecs + 5 (%d): Kubernetes would kill pods in the middle of their drain" (int .Values.terminationGracePeriodSeconds) (add $c.shutdownGraceSecs 5 | int)) -}}
{{- end -}}
{{- $notReady := mul .Values.probes.readiness.periodSeconds .Values.probes.readiness.failureThreshold | int -}}
{{- if lt (int $c.drainDelaySecs) $notReady -}}
{{- fail (printf "config.drainDelaySecs (%d) must be at least probes.readiness.periodSeconds x failureThreshold (%d): the pod would close clients before it leaves the Service" (int $c.drainDelaySecs) $notReady) -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) -}}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" -}}
{{- end -}}
{{- end -}}
