package deploytest

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	schedulingv1 "k8s.io/api/scheduling/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/yaml"
)

const namespace = "flowbus"

// object is one decoded manifest document.
type object struct {
	file string
	kind string
	meta *metav1.ObjectMeta
	obj  any
}

func (o object) String() string { return fmt.Sprintf("%s: %s %s", o.file, o.kind, o.meta.Name) }

var docSep = regexp.MustCompile(`(?m)^---[ \t]*$`)

// newObject maps apiVersion/kind to the typed API object. Only kinds the
// manifests are meant to hold are accepted.
func newObject(apiVersion, kind string) (any, *metav1.ObjectMeta, bool) {
	switch apiVersion + "/" + kind {
	case "v1/Namespace":
		o := &corev1.Namespace{}
		return o, &o.ObjectMeta, true
	case "v1/ServiceAccount":
		o := &corev1.ServiceAccount{}
		return o, &o.ObjectMeta, true
	case "v1/ConfigMap":
		o := &corev1.ConfigMap{}
		return o, &o.ObjectMeta, true
	case "v1/Service":
		o := &corev1.Service{}
		return o, &o.ObjectMeta, true
	case "v1/PersistentVolumeClaim":
		o := &corev1.PersistentVolumeClaim{}
		return o, &o.ObjectMeta, true
	case "apps/v1/DaemonSet":
		o := &appsv1.DaemonSet{}
		return o, &o.ObjectMeta, true
	case "apps/v1/Deployment":
		o := &appsv1.Deployment{}
		return o, &o.ObjectMeta, true
	case "apps/v1/StatefulSet":
		o := &appsv1.StatefulSet{}
		return o, &o.ObjectMeta, true
	case "policy/v1/PodDisruptionBudget":
		o := &policyv1.PodDisruptionBudget{}
		return o, &o.ObjectMeta, true
	case "scheduling.k8s.io/v1/PriorityClass":
		o := &schedulingv1.PriorityClass{}
		return o, &o.ObjectMeta, true
	// The Prometheus Operator's kinds (deploy/kubernetes/monitoring).
	case "monitoring.coreos.com/v1/PodMonitor":
		o := &monitoringv1.PodMonitor{}
		return o, &o.ObjectMeta, true
	case "monitoring.coreos.com/v1/PrometheusRule":
		o := &monitoringv1.PrometheusRule{}
		return o, &o.ObjectMeta, true
	}
	return nil, nil, false
}

// clusterScoped are the kinds that live in no namespace.
var clusterScoped = map[string]bool{"Namespace": true, "PriorityClass": true}

// manifestFiles are deploy/kubernetes/*.yaml and the YAML files of its
// subdirectories (each a kustomization of its own), kustomization.yaml
// included.
func manifestFiles(t *testing.T) []string {
	t.Helper()
	top, err := filepath.Glob(filepath.Join(root(t), "deploy", "kubernetes", "*.yaml"))
	if err != nil || len(top) == 0 {
		t.Fatalf("no manifests in deploy/kubernetes (%v)", err)
	}
	sub, _ := filepath.Glob(filepath.Join(root(t), "deploy", "kubernetes", "*", "*.yaml"))
	return append(top, sub...)
}

// loadManifests strictly decodes every document of the manifests: unknown or
// misspelt fields, duplicate keys and values of the wrong type (a quantity
// that does not parse, a string for an integer) are errors.
func loadManifests(t *testing.T) []object {
	t.Helper()
	files := manifestFiles(t)
	var objs []object
	for _, f := range files {
		rel, _ := filepath.Rel(root(t), f)
		if filepath.Base(f) == "kustomization.yaml" {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range docSep.Split(string(b), -1) {
			if strings.TrimSpace(stripComments(doc)) == "" {
				continue
			}
			var tm metav1.TypeMeta
			if err := yaml.Unmarshal([]byte(doc), &tm); err != nil {
				t.Errorf("%s document %d: %v", rel, i+1, err)
				continue
			}
			obj, meta, ok := newObject(tm.APIVersion, tm.Kind)
			if !ok {
				t.Errorf("%s document %d: unexpected apiVersion %q kind %q", rel, i+1, tm.APIVersion, tm.Kind)
				continue
			}
			if err := yaml.UnmarshalStrict([]byte(doc), obj); err != nil {
				t.Errorf("%s document %d (%s): %v", rel, i+1, tm.Kind, err)
				continue
			}
			objs = append(objs, object{file: rel, kind: tm.Kind, meta: meta, obj: obj})
		}
	}
	return objs
}

func stripComments(doc string) string {
	var b strings.Builder
	for _, l := range strings.Split(doc, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

func TestKubernetesManifests(t *testing.T) {
	objs := loadManifests(t)
	if t.Failed() {
		return
	}
	vars := agentVariables(t)
	configMaps := map[string]*corev1.ConfigMap{}
	seen := map[string]bool{}
	var pods []podOf
	for _, o := range objs {
		key := o.kind + "/" + o.meta.Name
		if seen[key] {
			t.Errorf("%s: defined twice", o)
		}
		seen[key] = true
		for _, msg := range validation.IsDNS1123Subdomain(o.meta.Name) {
			t.Errorf("%s: name: %s", o, msg)
		}
		switch {
		case o.kind == "Namespace":
			if o.meta.Name != namespace {
				t.Errorf("%s: the namespace is %s", o, namespace)
			}
		case clusterScoped[o.kind]:
			if o.meta.Namespace != "" {
				t.Errorf("%s: a %s has no namespace", o, o.kind)
			}
		case o.meta.Namespace != namespace:
			t.Errorf("%s: namespace %q, want %q", o, o.meta.Namespace, namespace)
		}
		checkLabels(t, o.String(), o.meta.Labels)
		checkRecommendedLabels(t, o.String(), o.kind != "Namespace", o.meta.Labels)
		switch v := o.obj.(type) {
		case *corev1.ConfigMap:
			configMaps[v.Name] = v
			for k := range v.Data {
				checkVariable(t, vars, o.String(), k)
			}
		case *appsv1.DaemonSet:
			pods = append(pods, podOf{o, v.Spec.Selector, &v.Spec.Template})
		case *appsv1.Deployment:
			pods = append(pods, podOf{o, v.Spec.Selector, &v.Spec.Template})
			if v.Spec.Replicas == nil {
				t.Errorf("%s: replicas not set", o)
			}
		case *appsv1.StatefulSet:
			pods = append(pods, podOf{o, v.Spec.Selector, &v.Spec.Template})
			if v.Spec.ServiceName == "" || !seen["Service/"+v.Spec.ServiceName] && !defines(objs, "Service", v.Spec.ServiceName) {
				t.Errorf("%s: serviceName %q is not a Service of the manifests", o, v.Spec.ServiceName)
			}
		}
	}
	for _, p := range pods {
		checkPod(t, p, configMaps, vars)
		checkPriorityClass(t, p, objs)
	}
	checkVersions(t, objs, pods)
	agentJob := alertsJob(t)
	for _, o := range objs {
		switch v := o.obj.(type) {
		case *corev1.Service:
			checkService(t, o, v, pods)
		case *policyv1.PodDisruptionBudget:
			if !selectsAny(t, o.String(), v.Spec.Selector, pods) {
				t.Errorf("%s: its selector matches no pod template", o)
			}
		case *monitoringv1.PodMonitor:
			checkPodMonitor(t, o, v, pods, agentJob)
		}
	}
	for _, want := range []string{"DaemonSet/flowagent", "ConfigMap/flowagent-config", "Deployment/flowstat", "StatefulSet/nats", "ConfigMap/nats-config",
		"PriorityClass/flowbus-agent", "PodMonitor/flowagent", "PrometheusRule/flowbus-agent"} {
		if !seen[want] {
			t.Errorf("the manifests define no %s", want)
		}
	}
}

func defines(objs []object, kind, name string) bool {
	for _, o := range objs {
		if o.kind == kind && o.meta.Name == name {
			return true
		}
	}
	return false
}

func checkLabels(t *testing.T, where string, l map[string]string) {
	t.Helper()
	for k, v := range l {
		for _, msg := range validation.IsQualifiedName(k) {
			t.Errorf("%s: label key %q: %s", where, k, msg)
		}
		for _, msg := range validation.IsValidLabelValue(v) {
			t.Errorf("%s: label %s=%q: %s", where, k, v, msg)
		}
	}
}

// The labels Kubernetes recommends (app.kubernetes.io/*).
const (
	nameLabel      = "app.kubernetes.io/name"
	instanceLabel  = "app.kubernetes.io/instance"
	versionLabel   = "app.kubernetes.io/version"
	componentLabel = "app.kubernetes.io/component"
	partOfLabel    = "app.kubernetes.io/part-of"
	managedByLabel = "app.kubernetes.io/managed-by"
)

// checkRecommendedLabels wants every recommended label on every object; the
// Namespace, shared by all components, has no component and no version.
func checkRecommendedLabels(t *testing.T, where string, component bool, l map[string]string) {
	t.Helper()
	for _, k := range []string{nameLabel, instanceLabel, versionLabel, componentLabel, partOfLabel, managedByLabel} {
		if !component && (k == versionLabel || k == componentLabel) {
			continue
		}
		if l[k] == "" {
			t.Errorf("%s: label %s is missing (every object carries the recommended app.kubernetes.io/* labels)", where, k)
		}
	}
	for k, want := range map[string]string{instanceLabel: "flowbus", partOfLabel: "flowbus", managedByLabel: "kustomize"} {
		if v, ok := l[k]; ok && v != want {
			t.Errorf("%s: label %s=%q, want %q like every other object", where, k, v, want)
		}
	}
}

// splitImage cuts an image reference into repository, tag and digest. A tag
// follows the last colon after the last slash (a registry may have a port).
func splitImage(image string) (repo, tag, digest string) {
	if i := strings.Index(image, "@"); i >= 0 {
		image, digest = image[:i], image[i+1:]
	}
	if i := strings.LastIndex(image, ":"); i > strings.LastIndex(image, "/") {
		return image[:i], image[i+1:], digest
	}
	return image, "", digest
}

// releaseTagRE is a pinned release tag: a version, with an optional variant
// or pre-release suffix (2.15.2-alpine, 1.0.0-rc.1).
var releaseTagRE = regexp.MustCompile(`^v?[0-9]+\.[0-9]+\.[0-9]+([-+][0-9A-Za-z.-]+)?$`)

// checkVersions wants each component's version label (on every object of it)
// to be the release its image runs, and flowbus's own images to be one
// release.
func checkVersions(t *testing.T, objs []object, pods []podOf) {
	t.Helper()
	versions := map[string]string{}
	flowbus := map[string]bool{}
	for _, p := range pods {
		v := p.tmpl.Labels[versionLabel]
		for _, c := range p.tmpl.Spec.Containers {
			repo, tag, _ := splitImage(c.Image)
			if tag != v && !strings.HasPrefix(tag, v+"-") {
				t.Errorf("%s: label %s=%q, but container %s runs %s", p.o, versionLabel, v, c.Name, c.Image)
			}
			if strings.HasPrefix(repo, "flowbus/") {
				flowbus[tag] = true
			}
		}
		versions[p.tmpl.Labels[nameLabel]] = v
	}
	for _, o := range objs {
		if v, ok := versions[o.meta.Labels[nameLabel]]; ok && o.meta.Labels[versionLabel] != v {
			t.Errorf("%s: label %s=%q, but %s %s runs version %q", o, versionLabel, o.meta.Labels[versionLabel], nameLabel, o.meta.Labels[nameLabel], v)
		}
	}
	if len(flowbus) > 1 {
		t.Errorf("the flowbus images are of different releases %v: deploy one release", sortedKeys(flowbus))
	}
}

// checkPriorityClass wants the agent's DaemonSet to have a priority class of
// the manifests, and every class a pod names to exist.
func checkPriorityClass(t *testing.T, p podOf, objs []object) {
	t.Helper()
	name := p.tmpl.Spec.PriorityClassName
	if _, ok := p.o.obj.(*appsv1.DaemonSet); ok && name == "" {
		t.Errorf("%s: no priorityClassName: on a full node its pod would not be scheduled, and nobody would report that node's connections", p.o)
	}
	if name == "" || strings.HasPrefix(name, "system-") {
		return
	}
	for _, o := range objs {
		if pc, ok := o.obj.(*schedulingv1.PriorityClass); ok && pc.Name == name {
			if pc.GlobalDefault {
				t.Errorf("%s: globalDefault would give every pod of the cluster this priority", o)
			}
			// The API server refuses user-defined values above one billion.
			if pc.Value <= 0 || pc.Value > 1_000_000_000 {
				t.Errorf("%s: value %d, want 1 to 1000000000", o, pc.Value)
			}
			return
		}
	}
	t.Errorf("%s: priorityClassName %q is not a PriorityClass of the manifests", p.o, name)
}

// alertsJob is the job name the alert rules select (FlowbusAgentDown needs
// one), or "" when no rule names a job.
func alertsJob(t *testing.T) string {
	t.Helper()
	jobs := map[string]bool{}
	for _, m := range regexp.MustCompile(`\bjob="([^"]*)"`).FindAllStringSubmatch(string(read(t, "deploy/prometheus/alerts.yml")), -1) {
		jobs[m[1]] = true
	}
	if len(jobs) > 1 {
		t.Errorf("deploy/prometheus/alerts.yml: the rules select several job names %v", sortedKeys(jobs))
	}
	for j := range jobs {
		return j
	}
	return ""
}

// checkPodMonitor wants a PodMonitor to scrape named ports of pods of the
// manifests and, for the agent, to give its targets the job name the alert
// rules select.
func checkPodMonitor(t *testing.T, o object, pm *monitoringv1.PodMonitor, pods []podOf, agentJob string) {
	t.Helper()
	sel, err := metav1.LabelSelectorAsSelector(&pm.Spec.Selector)
	if err != nil || sel.Empty() {
		t.Errorf("%s: selector missing or invalid (%v)", o, err)
		return
	}
	var matched []podOf
	for _, p := range pods {
		if sel.Matches(labels.Set(p.tmpl.Labels)) {
			matched = append(matched, p)
		}
	}
	if len(matched) == 0 {
		t.Errorf("%s: its selector matches no pod template", o)
		return
	}
	if len(pm.Spec.PodMetricsEndpoints) == 0 {
		t.Errorf("%s: no podMetricsEndpoints", o)
	}
	for _, ep := range pm.Spec.PodMetricsEndpoints {
		if ep.Port == nil || *ep.Port == "" {
			t.Errorf("%s: an endpoint without a port name: name the container's metrics port", o)
			continue
		}
		for _, p := range matched {
			if !hasPortName(p.tmpl.Spec.Containers, *ep.Port) {
				t.Errorf("%s: port %q is not a container port of %s", o, *ep.Port, p.o)
			}
		}
		for _, p := range matched {
			if _, agent := p.o.obj.(*appsv1.DaemonSet); !agent || agentJob == "" {
				continue
			}
			setsJob := slices.ContainsFunc(ep.RelabelConfigs, func(r monitoringv1.RelabelConfig) bool {
				return r.TargetLabel == "job" && (r.Action == "" || strings.EqualFold(r.Action, "replace")) &&
					len(r.SourceLabels) == 0 && r.Replacement != nil && *r.Replacement == agentJob
			})
			if !setsJob {
				t.Errorf("%s: the alert rules select job=%q: relabel the agent's targets to that job (the operator's default job is %s/%s)", o, agentJob, pm.Namespace, pm.Name)
			}
		}
	}
}

func hasPortName(cs []corev1.Container, name string) bool {
	for _, c := range cs {
		for _, p := range c.Ports {
			if p.Name == name {
				return true
			}
		}
	}
	return false
}

// containerEnv is a container's environment: its ConfigMaps', then its own
// variables (unexpanded).
func containerEnv(c corev1.Container, configMaps map[string]*corev1.ConfigMap) map[string]string {
	env := map[string]string{}
	for _, ef := range c.EnvFrom {
		if ef.ConfigMapRef != nil && configMaps[ef.ConfigMapRef.Name] != nil {
			for k, v := range configMaps[ef.ConfigMapRef.Name].Data {
				env[k] = v
			}
		}
	}
	for _, e := range c.Env {
		env[e.Name] = e.Value
	}
	return env
}

// metricsAddrEnv names, per flowbus image, the variable that sets where the
// program serves /metrics, /healthz and /readyz.
var metricsAddrEnv = map[string]string{
	"flowbus/flowagent": "FLOWBUS_METRICS_ADDR",
	"flowbus/flowstat":  "FLOWBUS_STAT_METRICS_ADDR",
}

// checkHealthEndpoints wants a flowbus program to listen where the kubelet
// and Prometheus reach it (not loopback), on its container port "metrics",
// with the liveness probe on /healthz and the readiness probe on /readyz.
func checkHealthEndpoints(t *testing.T, cw string, c corev1.Container, configMaps map[string]*corev1.ConfigMap) {
	t.Helper()
	repo, _, _ := splitImage(c.Image)
	envName, ok := metricsAddrEnv[repo]
	if !ok {
		return
	}
	addr := containerEnv(c, configMaps)[envName]
	if addr == "" {
		t.Errorf("%s: %s is not set: the program would listen on loopback only, out of reach of the kubelet's probes and of Prometheus", cw, envName)
		return
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Errorf("%s: %s=%q: %v", cw, envName, addr, err)
		return
	}
	if m := regexp.MustCompile(`^\$\(([A-Za-z_][A-Za-z0-9_]*)\)$`).FindStringSubmatch(host); m != nil {
		i := slices.IndexFunc(c.Env, func(e corev1.EnvVar) bool { return e.Name == m[1] })
		if i < 0 || c.Env[i].ValueFrom == nil || c.Env[i].ValueFrom.FieldRef == nil ||
			!slices.Contains([]string{"status.podIP", "status.hostIP"}, c.Env[i].ValueFrom.FieldRef.FieldPath) {
			t.Errorf("%s: %s=%q: $(%s) must be the pod's or the node's IP (fieldRef status.podIP or status.hostIP)", cw, envName, addr, m[1])
		}
	} else if ip := net.ParseIP(host); host == "localhost" || ip != nil && ip.IsLoopback() {
		t.Errorf("%s: %s=%q listens on loopback: the kubelet's probes and Prometheus cannot reach it", cw, envName, addr)
	}
	i := slices.IndexFunc(c.Ports, func(p corev1.ContainerPort) bool { return p.Name == "metrics" })
	if i < 0 {
		t.Errorf("%s: no container port named metrics (%s)", cw, addr)
		return
	}
	if strconv.Itoa(int(c.Ports[i].ContainerPort)) != port {
		t.Errorf("%s: %s=%q, but the metrics port is %d", cw, envName, addr, c.Ports[i].ContainerPort)
	}
	for _, pr := range []struct {
		name, path string
		probe      *corev1.Probe
	}{{"liveness", "/healthz", c.LivenessProbe}, {"readiness", "/readyz", c.ReadinessProbe}} {
		if pr.probe == nil || pr.probe.HTTPGet == nil {
			t.Errorf("%s: no %s probe (HTTP GET %s on port metrics)", cw, pr.name, pr.path)
			continue
		}
		g := pr.probe.HTTPGet
		if g.Path != pr.path || (g.Port.StrVal != "metrics" && g.Port.IntVal != c.Ports[i].ContainerPort) {
			t.Errorf("%s: %s probe GETs %s on port %s, want %s on port metrics", cw, pr.name, g.Path, g.Port.String(), pr.path)
		}
	}
}

type podOf struct {
	o        object
	selector *metav1.LabelSelector
	tmpl     *corev1.PodTemplateSpec
}

func selectsAny(t *testing.T, where string, sel *metav1.LabelSelector, pods []podOf) bool {
	t.Helper()
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil {
		t.Errorf("%s: selector: %v", where, err)
		return true
	}
	for _, p := range pods {
		if !s.Empty() && s.Matches(labels.Set(p.tmpl.Labels)) {
			return true
		}
	}
	return false
}

// checkPod checks what the API server would refuse or what would fail at
// run time: selectors, references between volumes, mounts, config maps,
// probes and ports, resources, security context, and FLOWBUS_* names.
func checkPod(t *testing.T, p podOf, configMaps map[string]*corev1.ConfigMap, vars map[string]bool) {
	t.Helper()
	where := p.o.String()
	sel, err := metav1.LabelSelectorAsSelector(p.selector)
	if err != nil || sel.Empty() {
		t.Errorf("%s: selector missing or invalid (%v)", where, err)
	} else if !sel.Matches(labels.Set(p.tmpl.Labels)) {
		t.Errorf("%s: the selector does not match the pod template's labels", where)
	}
	checkLabels(t, where+" template", p.tmpl.Labels)
	checkRecommendedLabels(t, where+" template", true, p.tmpl.Labels)
	spec := &p.tmpl.Spec
	volumes := map[string]*corev1.Volume{}
	for i := range spec.Volumes {
		v := &spec.Volumes[i]
		if volumes[v.Name] != nil {
			t.Errorf("%s: volume %s defined twice", where, v.Name)
		}
		volumes[v.Name] = v
		if v.ConfigMap != nil && configMaps[v.ConfigMap.Name] == nil {
			t.Errorf("%s: volume %s: ConfigMap %s is not in the manifests", where, v.Name, v.ConfigMap.Name)
		}
	}
	if ss, ok := p.o.obj.(*appsv1.StatefulSet); ok {
		for _, c := range ss.Spec.VolumeClaimTemplates {
			volumes[c.Name] = &corev1.Volume{Name: c.Name}
		}
	}
	if len(spec.Containers) == 0 {
		t.Errorf("%s: no containers", where)
	}
	for _, c := range append(append([]corev1.Container{}, spec.InitContainers...), spec.Containers...) {
		cw := where + " container " + c.Name
		if c.Image == "" {
			t.Errorf("%s: no image", cw)
		} else if _, tag, digest := splitImage(c.Image); digest == "" && !releaseTagRE.MatchString(tag) {
			t.Errorf("%s: image %s is not pinned: give it a release tag (or a digest), never latest or none", cw, c.Image)
		}
		if c.LivenessProbe == nil || c.ReadinessProbe == nil {
			t.Errorf("%s: a liveness and a readiness probe are required", cw)
		}
		checkHealthEndpoints(t, cw, c, configMaps)
		if c.Resources.Limits.Memory().IsZero() || c.Resources.Requests.Memory().IsZero() || c.Resources.Requests.Cpu().IsZero() {
			t.Errorf("%s: set memory and cpu requests and a memory limit", cw)
		}
		for _, m := range c.VolumeMounts {
			if volumes[m.Name] == nil {
				t.Errorf("%s: mount of undefined volume %s", cw, m.Name)
			}
		}
		ports := map[string]bool{}
		for _, pt := range c.Ports {
			if pt.Name != "" {
				for _, msg := range validation.IsValidPortName(pt.Name) {
					t.Errorf("%s: port name %q: %s", cw, pt.Name, msg)
				}
				ports[pt.Name] = true
			}
		}
		for name, pr := range map[string]*corev1.Probe{"liveness": c.LivenessProbe, "readiness": c.ReadinessProbe, "startup": c.StartupProbe} {
			if pr != nil && pr.HTTPGet != nil && pr.HTTPGet.Port.StrVal != "" && !ports[pr.HTTPGet.Port.StrVal] {
				t.Errorf("%s: %s probe uses port %q, which the container does not name", cw, name, pr.HTTPGet.Port.StrVal)
			}
		}
		defined := map[string]bool{}
		for _, ef := range c.EnvFrom {
			if ef.ConfigMapRef != nil {
				cm := configMaps[ef.ConfigMapRef.Name]
				if cm == nil {
					t.Errorf("%s: envFrom ConfigMap %s is not in the manifests", cw, ef.ConfigMapRef.Name)
					continue
				}
				for k := range cm.Data {
					defined[k] = true
				}
			}
		}
		for _, e := range c.Env {
			checkVariable(t, vars, cw, e.Name)
			for _, ref := range regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`).FindAllStringSubmatch(e.Value, -1) {
				if !defined[ref[1]] {
					t.Errorf("%s: %s refers to $(%s), which is not defined before it", cw, e.Name, ref[1])
				}
			}
			defined[e.Name] = true
			if e.ValueFrom != nil && e.ValueFrom.ConfigMapKeyRef != nil && configMaps[e.ValueFrom.ConfigMapKeyRef.Name] == nil {
				t.Errorf("%s: %s: ConfigMap %s is not in the manifests", cw, e.Name, e.ValueFrom.ConfigMapKeyRef.Name)
			}
		}
		sc := c.SecurityContext
		if sc == nil || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
			t.Errorf("%s: set allowPrivilegeEscalation: false and readOnlyRootFilesystem: true", cw)
		}
		if sc != nil && sc.Privileged != nil && *sc.Privileged {
			t.Errorf("%s: privileged: capabilities suffice", cw)
		}
		if sc == nil || sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") {
			t.Errorf("%s: drop ALL capabilities and add back what is needed", cw)
		}
	}
	// Prometheus configured by hand scrapes by these annotations.
	if port, ok := p.tmpl.Annotations["prometheus.io/port"]; ok {
		if !slices.ContainsFunc(spec.Containers, func(c corev1.Container) bool {
			return slices.ContainsFunc(c.Ports, func(cp corev1.ContainerPort) bool { return strconv.Itoa(int(cp.ContainerPort)) == port })
		}) {
			t.Errorf("%s: annotation prometheus.io/port=%q is no container port", where, port)
		}
	}
	if ds, ok := p.o.obj.(*appsv1.DaemonSet); ok {
		checkAgentDaemonSet(t, where, ds, configMaps)
	}
}

// checkAgentDaemonSet checks what the agent needs to work in a pod.
func checkAgentDaemonSet(t *testing.T, where string, ds *appsv1.DaemonSet, configMaps map[string]*corev1.ConfigMap) {
	t.Helper()
	spec := ds.Spec.Template.Spec
	if len(spec.Tolerations) == 0 {
		t.Errorf("%s: no tolerations: the agent would miss tainted nodes", where)
	}
	c := spec.Containers[0]
	allowed := []corev1.Capability{"BPF", "PERFMON", "NET_ADMIN", "SYS_RESOURCE"}
	for _, add := range c.SecurityContext.Capabilities.Add {
		if !slices.Contains(allowed, add) {
			t.Errorf("%s: capability %s is more than the agent needs (%v)", where, add, allowed)
		}
	}
	for _, need := range allowed[:3] {
		if !slices.Contains(c.SecurityContext.Capabilities.Add, need) {
			t.Errorf("%s: capability %s is missing", where, need)
		}
	}
	env := containerEnv(c, configMaps)
	cg := env["FLOWBUS_CGROUP_PATH"]
	if cg == "" {
		t.Fatalf("%s: FLOWBUS_CGROUP_PATH is not set: the agent would watch its own cgroup namespace", where)
	}
	hostPaths := map[string]string{}
	for _, v := range spec.Volumes {
		if v.HostPath != nil {
			hostPaths[v.Name] = v.HostPath.Path
		}
	}
	var cgroupMounted, bpffs bool
	for _, m := range c.VolumeMounts {
		hp := hostPaths[m.Name]
		if m.MountPath == cg && (hp == "/sys/fs/cgroup" || hp == "/sys/fs/cgroup/unified") {
			cgroupMounted = true
			if !m.ReadOnly {
				t.Errorf("%s: mount the host cgroup file system read-only", where)
			}
		}
		if hp == "/sys/fs/bpf" {
			bpffs = true
		}
	}
	if !cgroupMounted {
		t.Errorf("%s: FLOWBUS_CGROUP_PATH=%s is not the host's cgroup v2 file system mounted from a hostPath", where, cg)
	}
	if !bpffs {
		t.Errorf("%s: the BPF file system is not mounted", where)
	}
	if url := env["FLOWBUS_NATS_URL"]; url == "" {
		t.Errorf("%s: FLOWBUS_NATS_URL is empty: every agent would start its own embedded server", where)
	}
}

func checkService(t *testing.T, o object, s *corev1.Service, pods []podOf) {
	t.Helper()
	sel := labels.SelectorFromSet(s.Spec.Selector)
	var matched []podOf
	for _, p := range pods {
		if len(s.Spec.Selector) > 0 && sel.Matches(labels.Set(p.tmpl.Labels)) {
			matched = append(matched, p)
		}
	}
	if len(matched) == 0 {
		t.Errorf("%s: its selector matches no pod template", o)
		return
	}
	for _, sp := range s.Spec.Ports {
		if sp.TargetPort.StrVal == "" {
			continue
		}
		found := false
		for _, p := range matched {
			for _, c := range p.tmpl.Spec.Containers {
				for _, cp := range c.Ports {
					found = found || cp.Name == sp.TargetPort.StrVal
				}
			}
		}
		if !found {
			t.Errorf("%s: targetPort %q is not a container port name", o, sp.TargetPort.StrVal)
		}
	}
}

// TestKustomization checks that each kustomization.yaml (deploy/kubernetes
// and each of its subdirectories) lists exactly the manifests beside it.
func TestKustomization(t *testing.T) {
	dirs := map[string]bool{}
	for _, f := range manifestFiles(t) {
		dirs[filepath.Dir(f)] = true
	}
	for _, dir := range sortedKeys(dirs) {
		rel, _ := filepath.Rel(root(t), dir)
		var k struct {
			APIVersion string   `json:"apiVersion"`
			Kind       string   `json:"kind"`
			Namespace  string   `json:"namespace"`
			Resources  []string `json:"resources"`
		}
		if err := yaml.UnmarshalStrict(read(t, filepath.Join(rel, "kustomization.yaml")), &k); err != nil {
			t.Errorf("%s/kustomization.yaml: %v", rel, err)
			continue
		}
		if k.Kind != "Kustomization" || k.Namespace != namespace {
			t.Errorf("%s/kustomization.yaml: kind %q namespace %q", rel, k.Kind, k.Namespace)
		}
		files, _ := filepath.Glob(filepath.Join(dir, "*.yaml"))
		for _, f := range files {
			if b := filepath.Base(f); b != "kustomization.yaml" && !slices.Contains(k.Resources, b) {
				t.Errorf("%s/kustomization.yaml does not list %s", rel, b)
			}
		}
		for _, r := range k.Resources {
			if _, err := os.Stat(filepath.Join(dir, r)); err != nil {
				t.Errorf("%s/kustomization.yaml: %v", rel, err)
			}
		}
	}
}

// TestPrometheusRuleMatchesAlerts keeps the PrometheusRule of
// deploy/kubernetes/monitoring and deploy/prometheus/alerts.yml (which
// promtool checks and tests) the same rules.
func TestPrometheusRuleMatchesAlerts(t *testing.T) {
	var alerts map[string]any
	if err := yaml.Unmarshal(read(t, "deploy/prometheus/alerts.yml"), &alerts); err != nil {
		t.Fatalf("deploy/prometheus/alerts.yml: %v", err)
	}
	const file = "deploy/kubernetes/monitoring/prometheusrule.yaml"
	for _, doc := range docSep.Split(string(read(t, file)), -1) {
		var pr struct {
			Kind string         `json:"kind"`
			Spec map[string]any `json:"spec"`
		}
		if err := yaml.Unmarshal([]byte(doc), &pr); err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		if pr.Kind != "PrometheusRule" {
			continue
		}
		if alerts["groups"] == nil || !reflect.DeepEqual(pr.Spec["groups"], alerts["groups"]) {
			t.Errorf("%s: its groups differ from deploy/prometheus/alerts.yml: copy the file's groups under spec (indented 4 spaces)", file)
		}
		return
	}
	t.Fatalf("%s: no PrometheusRule", file)
}

// TestNATSConfigMapMatchesFiles keeps the ConfigMap of nats.yaml and the
// reference files of deploy/nats identical.
func TestNATSConfigMapMatchesFiles(t *testing.T) {
	for _, o := range loadManifests(t) {
		cm, ok := o.obj.(*corev1.ConfigMap)
		if !ok || cm.Name != "nats-config" {
			continue
		}
		for key, file := range map[string]string{"nats.conf": "deploy/nats/cluster.conf", "accounts.conf": "deploy/nats/accounts.conf"} {
			if !bytes.Equal([]byte(cm.Data[key]), read(t, file)) {
				t.Errorf("ConfigMap nats-config key %s differs from %s: copy the file into deploy/kubernetes/nats.yaml (indented 4 spaces)", key, file)
			}
		}
		return
	}
	t.Fatal("no ConfigMap nats-config in deploy/kubernetes")
}
