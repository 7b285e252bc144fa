// Reads a JSON array of Kubernetes objects on stdin; prints one JSON line per object:
// {"kind", "name", "valid", "error"}. The schemas come from npm packages published independently
// of hera and sovllm: @kubernetes-models/argo-workflows (Argo CRDs), @kubernetes-models/keda (KEDA's
// ScaledObject), @kubernetes-models/prometheus-operator (ServiceMonitor, PrometheusRule) and
// kubernetes-models (core APIs).
import * as argo from "@kubernetes-models/argo-workflows/argoproj.io/v1alpha1";
import * as keda from "@kubernetes-models/keda/keda.sh/v1alpha1";
import * as monitoring from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
import * as policy from "kubernetes-models/policy/v1";
import * as networking from "kubernetes-models/networking.k8s.io/v1";
import * as core from "kubernetes-models/v1";
import * as apps from "kubernetes-models/apps/v1";

const groups = {
  "argoproj.io/v1alpha1": argo,
  "keda.sh/v1alpha1": keda,
  "monitoring.coreos.com/v1": monitoring,
  "policy/v1": policy,
  "networking.k8s.io/v1": networking,
  "v1": core,
  "apps/v1": apps,
};

let input = "";
for await (const chunk of process.stdin) input += chunk;
for (const obj of JSON.parse(input)) {
  const group = groups[obj.apiVersion];
  const Model = group && group[obj.kind];
  const name = obj.metadata && (obj.metadata.name || obj.metadata.generateName);
  if (!Model) {
    console.log(JSON.stringify({ kind: obj.kind, name, valid: false, error: `no schema for ${obj.apiVersion} ${obj.kind}` }));
    continue;
  }
  try {
    new Model(obj).validate();
    console.log(JSON.stringify({ kind: obj.kind, name, valid: true }));
  } catch (e) {
    console.log(JSON.stringify({ kind: obj.kind, name, valid: false, error: String(e.message || e) }));
  }
}
