package deploytest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"
	appsv1 "k8s.io/api/apps/v1"
	"sigs.k8s.io/yaml"
)

// TestNATSConfigs parses the NATS configurations with nats-server itself and
// checks the per-host permissions of accounts.conf.
func TestNATSConfigs(t *testing.T) {
	hash := "$2a$11$abcdefghijklmnopqrstuuJ2NnTvCWtIUyt8bMaq2uWB/R7hxRb3e"
	t.Setenv("SERVER_NAME", "nats-0")
	t.Setenv("FLOWBUS_CONSUMER_PASSWORD_BCRYPT", hash)
	t.Setenv("FLOWBUS_ADMIN_PASSWORD_BCRYPT", hash)
	t.Setenv("NATS_SYS_PASSWORD_BCRYPT", hash)

	dev, err := server.ProcessConfigFile(filepath.Join(root(t), "deploy/nats/dev.conf"))
	if err != nil {
		t.Fatalf("deploy/nats/dev.conf: %v", err)
	}
	if !dev.JetStream || dev.HTTPPort != 8222 || dev.Port != 4222 {
		t.Errorf("dev.conf: want JetStream on, client port 4222, monitoring 8222; got %v %d %d", dev.JetStream, dev.Port, dev.HTTPPort)
	}

	opts, err := server.ProcessConfigFile(filepath.Join(root(t), "deploy/nats/cluster.conf"))
	if err != nil {
		t.Fatalf("deploy/nats/cluster.conf: %v", err)
	}
	if !opts.JetStream || opts.ServerName != "nats-0" || opts.Cluster.Name == "" || len(opts.Routes) != 3 {
		t.Errorf("cluster.conf: want JetStream, server_name from $SERVER_NAME, a named cluster with 3 routes; got js=%v name=%q cluster=%q routes=%d",
			opts.JetStream, opts.ServerName, opts.Cluster.Name, len(opts.Routes))
	}
	if opts.SystemAccount != "SYS" {
		t.Errorf("cluster.conf: system account %q", opts.SystemAccount)
	}
	if len(opts.Nkeys) == 0 {
		t.Fatal("accounts.conf: no per-host NKey users")
	}
	hostRE := regexp.MustCompile(`^flows\.([a-z0-9_-]+)\.>$`)
	hosts := map[string]bool{}
	for _, u := range opts.Nkeys {
		if !nkeys.IsValidPublicUserKey(u.Nkey) {
			t.Errorf("accounts.conf: %s is not a public user NKey", u.Nkey)
		}
		if u.Account == nil || u.Account.Name != "FLOWBUS" {
			t.Errorf("accounts.conf: host user %s is not in account FLOWBUS", u.Nkey)
		}
		p := u.Permissions
		if p == nil || p.Publish == nil || len(p.Publish.Allow) != 1 || len(p.Publish.Deny) != 0 {
			t.Errorf("accounts.conf: host user %s must publish to exactly one subject, flows.<host>.>", u.Nkey)
			continue
		}
		m := hostRE.FindStringSubmatch(p.Publish.Allow[0])
		if m == nil {
			t.Errorf("accounts.conf: host user %s publishes to %q, want flows.<host>.>", u.Nkey, p.Publish.Allow[0])
			continue
		}
		if hosts[m[1]] {
			t.Errorf("accounts.conf: two users publish as host %s", m[1])
		}
		hosts[m[1]] = true
		if p.Subscribe == nil || !slices.Equal(p.Subscribe.Allow, []string{"_INBOX.>"}) {
			t.Errorf("accounts.conf: host %s must subscribe to _INBOX.> only (JetStream acks), got %+v", m[1], p.Subscribe)
		}
	}
	var consumer bool
	for _, u := range opts.Users {
		if u.Username == "flowstat" {
			consumer = true
			if u.Permissions == nil || u.Permissions.Publish == nil || slices.ContainsFunc(u.Permissions.Publish.Allow, func(s string) bool { return strings.HasPrefix(s, "flows.") }) {
				t.Errorf("accounts.conf: the consumer user must not publish to flows.>")
			}
		}
	}
	if !consumer {
		t.Error("accounts.conf: no consumer user flowstat")
	}
}

// TestCompose checks docker-compose.yml: the agent's privileges and mounts,
// FLOWBUS_* names, files it refers to; then `docker compose config` or
// `docker-compose config` validates it against the Compose schema.
func TestCompose(t *testing.T) {
	var c struct {
		Services map[string]struct {
			Build *struct {
				Context    string `json:"context"`
				Dockerfile string `json:"dockerfile"`
				Target     string `json:"target"`
			} `json:"build"`
			Image       string            `json:"image"`
			Privileged  bool              `json:"privileged"`
			NetworkMode string            `json:"network_mode"`
			CapAdd      []string          `json:"cap_add"`
			CapDrop     []string          `json:"cap_drop"`
			SecurityOpt []string          `json:"security_opt"`
			Volumes     []string          `json:"volumes"`
			Environment map[string]string `json:"environment"`
			Profiles    []string          `json:"profiles"`
			Ports       []string          `json:"ports"`
			Healthcheck *struct {
				Test []string `json:"test"`
			} `json:"healthcheck"`
		} `json:"services"`
	}
	if err := yaml.Unmarshal(read(t, "docker-compose.yml"), &c); err != nil {
		t.Fatalf("docker-compose.yml: %v", err)
	}
	vars := agentVariables(t)
	dockerfile := string(read(t, "deploy/docker/Dockerfile"))
	for _, name := range []string{"nats", "flowagent", "flowstat", "flowtail"} {
		if _, ok := c.Services[name]; !ok {
			t.Errorf("docker-compose.yml: no service %s", name)
		}
	}
	for name, s := range c.Services {
		if s.Privileged {
			t.Errorf("service %s: privileged", name)
		}
		for _, o := range s.SecurityOpt {
			if strings.Contains(o, "unconfined") {
				t.Errorf("service %s: %s: Docker's default profiles allow what flowbus needs", name, o)
			}
		}
		for k := range s.Environment {
			checkVariable(t, vars, "service "+name, k)
		}
		if s.Build != nil {
			if !regexp.MustCompile(`(?m)^FROM .* AS ` + regexp.QuoteMeta(s.Build.Target) + `$`).MatchString(dockerfile) {
				t.Errorf("service %s: build target %q is not a stage of %s", name, s.Build.Target, s.Build.Dockerfile)
			}
			if _, err := os.Stat(filepath.Join(root(t), s.Build.Context, s.Build.Dockerfile)); err != nil {
				t.Errorf("service %s: %v", name, err)
			}
		}
		for _, v := range s.Volumes {
			if src, _, _ := strings.Cut(v, ":"); strings.HasPrefix(src, "./") {
				if _, err := os.Stat(filepath.Join(root(t), src)); err != nil {
					t.Errorf("service %s: %v", name, err)
				}
			}
		}
	}
	// The long-running services have a health check; the flowbus images are
	// FROM scratch, so theirs runs the image's own binary: `<it> probe`.
	for _, name := range []string{"nats", "flowagent", "flowstat"} {
		h := c.Services[name].Healthcheck
		if h == nil || len(h.Test) < 2 {
			t.Errorf("service %s: no healthcheck", name)
			continue
		}
		if name == "nats" {
			continue
		}
		bin := "/usr/local/bin/" + name
		if want := []string{"CMD", bin, "probe"}; !slices.Equal(h.Test, want) {
			t.Errorf("service %s: healthcheck %q, want %q (no shell or wget in the image)", name, h.Test, want)
		}
		if !regexp.MustCompile(`(?m)^COPY .* ` + regexp.QuoteMeta(bin) + `$`).MatchString(dockerfile) {
			t.Errorf("service %s: the Dockerfile copies no %s for its healthcheck", name, bin)
		}
	}
	a := c.Services["flowagent"]
	if a.NetworkMode != "host" {
		t.Errorf("flowagent: network_mode %q, want host", a.NetworkMode)
	}
	if !slices.Contains(a.CapDrop, "ALL") {
		t.Error("flowagent: cap_drop ALL, then add what is needed")
	}
	for _, cp := range a.CapAdd {
		if !slices.Contains([]string{"BPF", "PERFMON", "NET_ADMIN", "SYS_RESOURCE"}, cp) {
			t.Errorf("flowagent: capability %s is more than the agent needs", cp)
		}
	}
	cg := a.Environment["FLOWBUS_CGROUP_PATH"]
	mounted := false
	interp := regexp.MustCompile(`\$\{[A-Za-z0-9_]+:-([^}]*)\}`)
	for _, v := range a.Volumes {
		parts := strings.Split(interp.ReplaceAllString(v, "$1"), ":")
		if len(parts) >= 2 && parts[1] == cg && strings.Contains(parts[0], "/sys/fs/cgroup") {
			mounted = true
			if len(parts) < 3 || parts[2] != "ro" {
				t.Error("flowagent: mount the host cgroup file system read-only")
			}
		}
	}
	if cg == "" || !mounted {
		t.Errorf("flowagent: FLOWBUS_CGROUP_PATH (%q) must name the host's /sys/fs/cgroup mounted into the container", cg)
	}
	// The agent shares the host's network namespace: it reaches NATS through
	// the port published on the host's loopback.
	if a.Environment["FLOWBUS_NATS_URL"] != "nats://127.0.0.1:4222" || !slices.Contains(c.Services["nats"].Ports, "127.0.0.1:4222:4222") {
		t.Errorf("flowagent reaches NATS at %q; want nats://127.0.0.1:4222, published by nats as 127.0.0.1:4222:4222", a.Environment["FLOWBUS_NATS_URL"])
	}

	bin := tool(t, true, "docker-compose", "docker")
	args := []string{"-f", "docker-compose.yml", "-p", "flowbus", "config", "-q"}
	if filepath.Base(bin) == "docker" {
		args = append([]string{"compose"}, args...)
	}
	cmd := exec.Command(bin, args...)
	cmd.Dir = root(t)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", bin, strings.Join(args, " "), err, out)
	}
}

// TestSystemdUnits runs systemd-analyze verify on the units, with ExecStart
// pointed at an existing program (the binaries are not installed here).
func TestSystemdUnits(t *testing.T) {
	units, _ := filepath.Glob(filepath.Join(root(t), "deploy", "systemd", "*.service"))
	if len(units) == 0 {
		t.Fatal("no units in deploy/systemd")
	}
	for _, u := range units {
		b, _ := os.ReadFile(u)
		for _, m := range flowbusVar.FindAllString(string(b), -1) {
			checkVariable(t, agentVariables(t), filepath.Base(u), m)
		}
	}
	for _, u := range units {
		checkUnitDocumentation(t, u)
	}
	bin := tool(t, false, "systemd-analyze")
	dir := t.TempDir()
	var args []string
	for _, u := range units {
		b, _ := os.ReadFile(u)
		s := regexp.MustCompile(`(?m)^ExecStart=\S+`).ReplaceAllString(string(b), "ExecStart=/bin/true")
		p := filepath.Join(dir, filepath.Base(u))
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		args = append(args, p)
	}
	out, err := exec.Command(bin, append([]string{"verify"}, args...)...).CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// repoDocRE is a link to a file of this repository on its main branch.
var repoDocRE = regexp.MustCompile(`^https://github\.com/flowbus/flowbus/blob/main/([^#]+)(?:#(.*))?$`)

// checkUnitDocumentation wants each Documentation= of a unit to open: a
// file: path only if the unit's install lines install it, a link to this
// repository only to a file (and Markdown heading) that exists, a man: page
// only if man finds it.
func checkUnitDocumentation(t *testing.T, unit string) {
	t.Helper()
	b, _ := os.ReadFile(unit)
	name := filepath.Base(unit)
	var docs []string
	for _, m := range regexp.MustCompile(`(?m)^Documentation=(.*)$`).FindAllStringSubmatch(string(b), -1) {
		docs = append(docs, strings.Fields(m[1])...)
	}
	if len(docs) == 0 {
		t.Errorf("%s: no Documentation=", name)
	}
	for _, d := range docs {
		switch u, err := url.Parse(d); {
		case err != nil:
			t.Errorf("%s: Documentation=%s: %v", name, d, err)
		case u.Scheme == "file":
			installed := slices.ContainsFunc(regexp.MustCompile(`(?m)^#\s+install .*$`).FindAllString(string(b), -1), func(l string) bool {
				return strings.Contains(l, u.Path)
			})
			if !installed {
				t.Errorf("%s: Documentation=%s: nothing installs that file (no install line of the unit's comment names it); link to the documentation online", name, d)
			}
		case u.Scheme == "man":
			page, section := u.Opaque, ""
			if m := regexp.MustCompile(`^(.+)\(([0-9a-z]+)\)$`).FindStringSubmatch(u.Opaque); m != nil {
				page, section = m[1], m[2]
			}
			if man, err := exec.LookPath("man"); err == nil {
				args := []string{"-w", page}
				if section != "" {
					args = []string{"-w", section, page}
				}
				if out, err := exec.Command(man, args...).CombinedOutput(); err != nil {
					t.Errorf("%s: Documentation=%s: no such man page: %s", name, d, out)
				}
			}
		case u.Scheme == "https" || u.Scheme == "http":
			m := repoDocRE.FindStringSubmatch(d)
			if m == nil {
				continue // another site: not checkable offline
			}
			doc, err := os.ReadFile(filepath.Join(root(t), m[1]))
			if err != nil {
				t.Errorf("%s: Documentation=%s: the repository has no %s", name, d, m[1])
			} else if m[2] != "" && !slices.Contains(markdownAnchors(string(doc)), m[2]) {
				t.Errorf("%s: Documentation=%s: %s has no heading #%s", name, d, m[1], m[2])
			}
		default:
			t.Errorf("%s: Documentation=%s: use an http(s):, man: or installed file: URI", name, d)
		}
	}
}

// markdownAnchors are the fragment names GitHub gives a Markdown text's
// headings: lowercased, punctuation dropped, spaces as hyphens.
func markdownAnchors(md string) []string {
	var out []string
	for _, m := range regexp.MustCompile(`(?m)^#{1,6} (.+)$`).FindAllStringSubmatch(md, -1) {
		a := strings.Map(func(r rune) rune {
			switch {
			case r == ' ':
				return '-'
			case r == '-' || r == '_' || r >= '0' && r <= '9' || r >= 'a' && r <= 'z':
				return r
			}
			return -1
		}, strings.ToLower(strings.TrimSpace(m[1])))
		out = append(out, a)
	}
	return out
}

// TestGrafanaDashboard checks the dashboard JSON: every metric it queries
// exists, it shows every agent metric, every selector applies the dashboard's
// variables, and every panel has one unit, the one its queries measure.
func TestGrafanaDashboard(t *testing.T) {
	checkDashboard(t, "deploy/grafana/flowbus-agent.json", agentMetrics(t))
}

// checkDashboard checks one dashboard file against the metrics m it must show.
func checkDashboard(t *testing.T, file string, m metrics) {
	t.Helper()
	var d struct {
		UID    string `json:"uid"`
		Title  string `json:"title"`
		Panels []struct {
			ID          int    `json:"id"`
			Type        string `json:"type"`
			Title       string `json:"title"`
			FieldConfig struct {
				Defaults struct {
					Unit string `json:"unit"`
				} `json:"defaults"`
				Overrides []struct {
					Properties []struct {
						ID string `json:"id"`
					} `json:"properties"`
				} `json:"overrides"`
			} `json:"fieldConfig"`
			Targets []struct {
				Expr  string `json:"expr"`
				RefID string `json:"refId"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Name  string `json:"name"`
				Type  string `json:"type"`
				Query any    `json:"query"` // a string, or an object with "query"
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(read(t, file), &d); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	if d.UID == "" || d.Title == "" || len(d.Panels) == 0 {
		t.Fatalf("%s: uid, title and panels are required", file)
	}
	vars := map[string]bool{"__rate_interval": true}
	for _, v := range d.Templating.List {
		vars[v.Name] = true
	}
	// The label filters every series selector must apply: the query
	// variables, each on its label.
	var filters []string
	for _, v := range d.Templating.List {
		if v.Type == "query" {
			filters = append(filters, v.Name+`=~"$`+v.Name+`"`)
		}
	}
	if !slices.Contains(filters, `job=~"$job"`) || !slices.Contains(filters, `instance=~"$instance"`) {
		t.Errorf("dashboard: want the query variables job and instance, have %v", filters)
	}
	// Each query variable's values are narrowed by the ones before it
	// (instance by job).
	var before []string
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		q := fmt.Sprint(v.Query)
		if qm, ok := v.Query.(map[string]any); ok {
			q = fmt.Sprint(qm["query"])
		}
		for _, f := range before {
			if !strings.Contains(q, f) {
				t.Errorf("variable %s: its query %s does not apply %s", v.Name, q, f)
			}
		}
		before = append(before, v.Name+`=~"$`+v.Name+`"`)
	}
	ids := map[int]bool{}
	used := map[string]bool{}
	for _, p := range d.Panels {
		if ids[p.ID] {
			t.Errorf("panel %q: id %d used twice", p.Title, p.ID)
		}
		ids[p.ID] = true
		if p.Type != "row" && len(p.Targets) == 0 {
			t.Errorf("panel %q: no query", p.Title)
		}
		if p.Type != "row" {
			var exprs []string
			for _, tg := range p.Targets {
				exprs = append(exprs, tg.Expr)
			}
			checkPanelUnit(t, p.Title, p.FieldConfig.Defaults.Unit, exprs)
		}
		for _, o := range p.FieldConfig.Overrides {
			for _, pr := range o.Properties {
				if pr.ID == "unit" {
					t.Errorf("panel %q: an override sets a second unit: one unit per panel (split it)", p.Title)
				}
			}
		}
		for _, tg := range p.Targets {
			for _, sel := range selectorRE.FindAllStringSubmatch(tg.Expr, -1) {
				for _, f := range filters {
					if !strings.Contains(sel[2], f) {
						t.Errorf("panel %q: %s%s does not apply %s", p.Title, sel[1], sel[2], f)
					}
				}
			}
			if bad := m.unknown(tg.Expr); len(bad) > 0 {
				t.Errorf("panel %q: unknown metrics %v in %s", p.Title, bad, tg.Expr)
			}
			for _, r := range m.referenced(tg.Expr) {
				used[r] = true
			}
			for _, v := range regexp.MustCompile(`\$(\w+)`).FindAllStringSubmatch(tg.Expr, -1) {
				if !vars[v[1]] {
					t.Errorf("panel %q: variable $%s is not defined", p.Title, v[1])
				}
			}
		}
	}
	for _, name := range sortedKeys(m.names) {
		if !used[name] {
			t.Errorf("%s does not show %s", file, name)
		}
	}
}

// selectorRE is a series selector of a PromQL expression: a metric name and
// its label matchers, if any.
var selectorRE = regexp.MustCompile(`\b((?:flowbus|process|go)_[a-z0-9_]+|up)\b(\{[^}]*\})?`)

// unitsOf are the Grafana units that show each quantity.
var unitsOf = map[string][]string{
	"count":     {"short", "none"},
	"count/s":   {"ops", "cps"},
	"bytes":     {"bytes", "decbytes"},
	"bytes/s":   {"binBps", "Bps"},
	"seconds":   {"s"},
	"seconds/s": {"suffix: cores", "percentunit"}, // CPU seconds per second
	"ratio":     {"percentunit"},
}

// quantity is what a PromQL expression measures: from the metric names it
// reads (by Prometheus naming, _bytes and _seconds; otherwise a count) and
// what it does with them: a quantile or mean of a histogram is of its
// observations, a quotient of two counts is a ratio, a rate is per second.
func quantity(expr string) (string, error) {
	base := ""
	for _, ref := range metricRefRE.FindAllString(expr, -1) {
		q := "count"
		switch {
		case strings.Contains(ref, "_bytes"):
			q = "bytes"
		case strings.Contains(ref, "_seconds"):
			q = "seconds"
		}
		if base != "" && q != base {
			return "", fmt.Errorf("it mixes %s with %s", base, q)
		}
		base = q
	}
	switch {
	case base == "":
		return "", fmt.Errorf("it reads no metric")
	case strings.Contains(expr, "histogram_quantile("), strings.Contains(expr, "_sum") && strings.Contains(expr, "_count"):
		return base, nil
	case strings.Contains(expr, " / "):
		return "ratio", nil
	case strings.Contains(expr, "rate("):
		return base + "/s", nil
	}
	return base, nil
}

// checkPanelUnit wants a panel's queries to measure one quantity, shown in
// a unit of that quantity: no bytes/s beside batches/s, no memory beside CPU.
func checkPanelUnit(t *testing.T, title, unit string, exprs []string) {
	t.Helper()
	if unit == "" {
		t.Errorf("panel %q: no unit (fieldConfig.defaults.unit)", title)
	}
	var q0, e0 string
	for _, e := range exprs {
		q, err := quantity(e)
		if err != nil {
			t.Errorf("panel %q: %s: %v", title, e, err)
			continue
		}
		if q0 == "" {
			q0, e0 = q, e
		} else if q != q0 {
			t.Errorf("panel %q: %s measures %s, %s measures %s: one unit per panel (split it)", title, e0, q0, e, q)
		}
	}
	if q0 != "" && unit != "" && !slices.Contains(unitsOf[q0], unit) {
		t.Errorf("panel %q: unit %q, but its queries measure %s: use %s", title, unit, q0, strings.Join(unitsOf[q0], " or "))
	}
}

// TestAlertRules checks alerts.yml: structure, known metrics, an absolute
// runbook URL per alert (one base, the alert's OPERATIONS.md section as
// fragment), then promtool: check rules, and test rules with alerts_test.yml,
// which must make every alert fire and stay silent at least once.
func TestAlertRules(t *testing.T) {
	var f struct {
		Groups []struct {
			Name  string `json:"name"`
			Rules []struct {
				Alert       string            `json:"alert"`
				Expr        string            `json:"expr"`
				For         string            `json:"for"`
				Labels      map[string]string `json:"labels"`
				Annotations map[string]string `json:"annotations"`
			} `json:"rules"`
		} `json:"groups"`
	}
	if err := yaml.UnmarshalStrict(read(t, "deploy/prometheus/alerts.yml"), &f); err != nil {
		t.Fatalf("deploy/prometheus/alerts.yml: %v", err)
	}
	ops := strings.ToLower(string(read(t, "deploy/OPERATIONS.md")))
	m := allMetrics(t)
	var alerts []string
	bases := map[string]bool{}
	for _, g := range f.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" || r.Expr == "" {
				t.Errorf("group %s: a rule without alert name or expr", g.Name)
				continue
			}
			alerts = append(alerts, r.Alert)
			if bad := m.unknown(r.Expr); len(bad) > 0 {
				t.Errorf("%s: unknown metrics %v", r.Alert, bad)
			}
			if !slices.Contains([]string{"critical", "warning", "info"}, r.Labels["severity"]) {
				t.Errorf("%s: severity %q", r.Alert, r.Labels["severity"])
			}
			if r.Annotations["summary"] == "" {
				t.Errorf("%s: no summary", r.Alert)
			}
			// Alertmanager, Grafana and chat links open runbook_url as is: a
			// relative path leads nowhere.
			raw := r.Annotations["runbook_url"]
			u, err := url.Parse(raw)
			if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
				t.Errorf("%s: runbook_url %q is not an absolute http(s) URL", r.Alert, raw)
			} else if u.Fragment != strings.ToLower(r.Alert) {
				t.Errorf("%s: runbook_url %q, want the base URL with #%s", r.Alert, raw, strings.ToLower(r.Alert))
			} else {
				bases[strings.TrimSuffix(raw, "#"+u.Fragment)] = true
			}
			if !strings.Contains(ops, "\n### "+strings.ToLower(r.Alert)+"\n") {
				t.Errorf("%s: deploy/OPERATIONS.md has no section \"### %s\"", r.Alert, r.Alert)
			}
		}
	}
	if len(alerts) == 0 {
		t.Fatal("alerts.yml: no rules")
	}
	if len(bases) > 1 {
		t.Errorf("the runbook URLs have several bases %v: one base, so that one replacement moves them all", sortedKeys(bases))
	}
	checkAlertTests(t, alerts)

	bin := tool(t, true, "promtool")
	for _, args := range [][]string{{"check", "rules", "alerts.yml"}, {"test", "rules", "alerts_test.yml"}} {
		cmd := exec.Command(bin, args...)
		cmd.Dir = filepath.Join(root(t), "deploy", "prometheus")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// checkAlertTests wants alerts_test.yml to evaluate every alert at least once
// where it fires and once where it does not, and nothing else.
func checkAlertTests(t *testing.T, alerts []string) {
	t.Helper()
	var f struct {
		RuleFiles []string `json:"rule_files"`
		Tests     []struct {
			Name       string `json:"name"`
			AlertTests []struct {
				Alertname string `json:"alertname"`
				ExpAlerts []any  `json:"exp_alerts"`
			} `json:"alert_rule_test"`
		} `json:"tests"`
	}
	if err := yaml.Unmarshal(read(t, "deploy/prometheus/alerts_test.yml"), &f); err != nil {
		t.Fatalf("deploy/prometheus/alerts_test.yml: %v", err)
	}
	if !slices.Equal(f.RuleFiles, []string{"alerts.yml"}) {
		t.Errorf("alerts_test.yml: rule_files %v, want [alerts.yml]", f.RuleFiles)
	}
	fires, silent := map[string]bool{}, map[string]bool{}
	for _, tc := range f.Tests {
		for _, at := range tc.AlertTests {
			if !slices.Contains(alerts, at.Alertname) {
				t.Errorf("alerts_test.yml, test %q: no alert %s in alerts.yml", tc.Name, at.Alertname)
			}
			if len(at.ExpAlerts) > 0 {
				fires[at.Alertname] = true
			} else {
				silent[at.Alertname] = true
			}
		}
	}
	for _, a := range alerts {
		if !fires[a] {
			t.Errorf("alerts_test.yml: no case where %s fires", a)
		}
		if !silent[a] {
			t.Errorf("alerts_test.yml: no case where %s stays silent", a)
		}
	}
}

// fencedRE finds the ```yaml and ```sh blocks of a Markdown text.
var fencedRE = regexp.MustCompile("(?s)```(yaml|sh)\n(.*?)```")

// TestOperationsPrometheusConfig checks the hand-written Prometheus
// configuration that deploy/OPERATIONS.md shows: promtool accepts it with the
// rules, and its job is the one the rules select.
func TestOperationsPrometheusConfig(t *testing.T) {
	var cfg string
	for _, m := range fencedRE.FindAllStringSubmatch(string(read(t, "deploy/OPERATIONS.md")), -1) {
		if m[1] == "yaml" && strings.Contains(m[2], "scrape_configs:") {
			cfg = m[2]
		}
	}
	if cfg == "" {
		t.Fatal("deploy/OPERATIONS.md shows no Prometheus configuration (a yaml block with scrape_configs)")
	}
	var c struct {
		RuleFiles     []string `json:"rule_files"`
		ScrapeConfigs []struct {
			JobName string `json:"job_name"`
		} `json:"scrape_configs"`
	}
	if err := yaml.Unmarshal([]byte(cfg), &c); err != nil {
		t.Fatalf("deploy/OPERATIONS.md, Prometheus configuration: %v", err)
	}
	job := alertsJob(t)
	if !slices.ContainsFunc(c.ScrapeConfigs, func(s struct {
		JobName string `json:"job_name"`
	}) bool {
		return s.JobName == job
	}) {
		t.Errorf("deploy/OPERATIONS.md, Prometheus configuration: no job %q, which the alert rules select", job)
	}
	bin := tool(t, true, "promtool")
	dir := t.TempDir()
	for name, b := range map[string][]byte{"prometheus.yml": []byte(cfg), "alerts.yml": read(t, "deploy/prometheus/alerts.yml")} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	out, err := exec.Command(bin, "check", "config", filepath.Join(dir, "prometheus.yml")).CombinedOutput()
	if err != nil && bytes.Contains(out, []byte("field kubernetes_sd_configs not found")) {
		// Debian builds Prometheus without Kubernetes discovery: check the
		// rest (relabelings, rule files) with the discovery swapped for an
		// empty static list.
		t.Log("this promtool has no Kubernetes service discovery: checking the configuration with kubernetes_sd_configs replaced by static_configs")
		if err := os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(withoutKubernetesSD(cfg)), 0o644); err != nil {
			t.Fatal(err)
		}
		out, err = exec.Command(bin, "check", "config", filepath.Join(dir, "prometheus.yml")).CombinedOutput()
	}
	if err != nil {
		t.Errorf("promtool check config (deploy/OPERATIONS.md's configuration): %v\n%s", err, out)
	}
}

// withoutKubernetesSD replaces each kubernetes_sd_configs block (the key and
// the lines indented below it) with an empty static_configs.
func withoutKubernetesSD(cfg string) string {
	var out []string
	skip := -1
	for _, l := range strings.Split(cfg, "\n") {
		indent := len(l) - len(strings.TrimLeft(l, " "))
		if skip >= 0 && (indent > skip || strings.TrimSpace(l) == "") {
			continue
		}
		skip = -1
		if strings.TrimSpace(l) == "kubernetes_sd_configs:" {
			skip = indent
			l = strings.Repeat(" ", indent) + "static_configs: []"
		}
		out = append(out, l)
	}
	return strings.Join(out, "\n")
}

// TestRunbookBaseReplacement runs the replacement of the runbook base URL
// that deploy/OPERATIONS.md documents: it must name every file that holds the
// base, and leave rules whose tests still pass, with the new base.
func TestRunbookBaseReplacement(t *testing.T) {
	sedRE := regexp.MustCompile(`sed -i 's\|([^|]+)\|([^|]+)\|g' \\\n\s*([^\n]+)`)
	var m []string
	for _, b := range fencedRE.FindAllStringSubmatch(string(read(t, "deploy/OPERATIONS.md")), -1) {
		if b[1] == "sh" {
			if m = sedRE.FindStringSubmatch(b[2]); m != nil {
				break
			}
		}
	}
	if m == nil {
		t.Fatal("deploy/OPERATIONS.md shows no replacement of the runbook base (sed -i 's|<base>|<new>|g' <files>)")
	}
	oldBase, newBase, files := m[1], m[2], strings.Fields(m[3])
	if !strings.Contains(string(read(t, "deploy/prometheus/alerts.yml")), `runbook_url: "`+oldBase+"#") {
		t.Errorf("deploy/OPERATIONS.md replaces %s, which is not the runbook base of alerts.yml", oldBase)
	}
	// Every file of the deployment that holds the base must be in the command.
	err := filepath.WalkDir(filepath.Join(root(t), "deploy"), func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || strings.HasSuffix(p, ".go") || strings.HasSuffix(p, ".md") {
			return err
		}
		rel, _ := filepath.Rel(root(t), p)
		if b, _ := os.ReadFile(p); bytes.Contains(b, []byte(oldBase+"#")) && !slices.Contains(files, rel) {
			t.Errorf("%s holds runbook URLs, but deploy/OPERATIONS.md's replacement does not name it", rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	bin := tool(t, true, "promtool")
	dir := t.TempDir()
	for _, f := range []string{"deploy/prometheus/alerts.yml", "deploy/prometheus/alerts_test.yml"} {
		if !slices.Contains(files, f) {
			t.Errorf("deploy/OPERATIONS.md's replacement does not name %s", f)
		}
		b := bytes.ReplaceAll(read(t, f), []byte(oldBase), []byte(newBase))
		if err := os.WriteFile(filepath.Join(dir, filepath.Base(f)), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command(bin, "test", "rules", "alerts_test.yml")
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("promtool test rules, after the documented replacement of the runbook base: %v\n%s", err, out)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "alerts.yml")); bytes.Contains(b, []byte(oldBase)) || !bytes.Contains(b, []byte(newBase+"#")) {
		t.Errorf("after the documented replacement, alerts.yml still holds %s or not %s", oldBase, newBase)
	}
}

// TestNATSImageMatchesGoMod keeps the NATS of docker-compose.yml and of the
// Kubernetes StatefulSet the release that the agent embeds (go.mod), so that
// the dev stack, the cluster and the embedded server behave alike.
func TestNATSImageMatchesGoMod(t *testing.T) {
	m := regexp.MustCompile(`(?m)^\s*github\.com/nats-io/nats-server/v2 v(\S+)`).FindSubmatch(read(t, "go.mod"))
	if m == nil {
		t.Fatal("go.mod requires no github.com/nats-io/nats-server/v2")
	}
	want := string(m[1])
	images := map[string]string{}
	var c struct {
		Services map[string]struct {
			Image string `json:"image"`
		} `json:"services"`
	}
	if err := yaml.Unmarshal(read(t, "docker-compose.yml"), &c); err != nil {
		t.Fatalf("docker-compose.yml: %v", err)
	}
	// ${NATS_IMAGE:-nats:2.15.2-alpine}: the default is what runs.
	images["docker-compose.yml service nats"] = regexp.MustCompile(`^\$\{[A-Z0-9_]+:-(.*)\}$`).ReplaceAllString(c.Services["nats"].Image, "$1")
	for _, o := range loadManifests(t) {
		if ss, ok := o.obj.(*appsv1.StatefulSet); ok && ss.Name == "nats" {
			for _, ctr := range ss.Spec.Template.Spec.Containers {
				images[o.String()+" container "+ctr.Name] = ctr.Image
			}
		}
	}
	if len(images) < 2 || c.Services["nats"].Image == "" {
		t.Fatalf("want the NATS image of docker-compose.yml (service nats) and of the StatefulSet nats, found %v", images)
	}
	for where, image := range images {
		repo, tag, _ := splitImage(image)
		if repo != "nats" || (tag != want && !strings.HasPrefix(tag, want+"-")) {
			t.Errorf("%s: image %q, want nats:%s (or a variant such as nats:%s-alpine), the nats-server of go.mod", where, image, want, want)
		}
	}
}

// TestDockerfileStampsVersion builds a program with the -ldflags of the
// Dockerfile's go build, VERSION set, and wants its --version to name that
// version: the build argument reaches the binaries.
func TestDockerfileStampsVersion(t *testing.T) {
	if testing.Short() {
		t.Skip("builds flowtail")
	}
	df := string(read(t, "deploy/docker/Dockerfile"))
	// The RUN instruction with go build, continuation lines joined.
	run := regexp.MustCompile(`(?m)^RUN (?:.*\\\n)*.*$`)
	var build string
	for _, r := range run.FindAllString(df, -1) {
		if strings.Contains(r, "go build") {
			build = strings.ReplaceAll(r, "\\\n", " ")
		}
	}
	if build == "" {
		t.Fatal("deploy/docker/Dockerfile: no RUN with go build")
	}
	arg := strings.Index(df, "\nARG VERSION")
	if arg < 0 || arg > strings.Index(df, build[:20]) || arg < strings.Index(df, " AS build") {
		t.Error("deploy/docker/Dockerfile: ARG VERSION must be declared in the build stage before go build")
	}
	m := regexp.MustCompile(`-ldflags="([^"]*)"`).FindStringSubmatch(build)
	if m == nil || !strings.Contains(m[1], "-X github.com/flowbus/flowbus/cmd/internal/buildinfo.Version=") {
		t.Fatalf("deploy/docker/Dockerfile: go build does not stamp buildinfo.Version (-ldflags \"-X github.com/flowbus/flowbus/cmd/internal/buildinfo.Version=${VERSION}\"): %s", build)
	}
	const version = "9.8.7-deploytest"
	flags := strings.NewReplacer("${VERSION}", version, "$VERSION", version).Replace(m[1])
	bin := filepath.Join(t.TempDir(), "flowtail")
	cmd := exec.Command("go", "build", "-ldflags="+flags, "-o", bin, "./cmd/flowtail")
	cmd.Dir = root(t)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build -ldflags=%q ./cmd/flowtail: %v\n%s", flags, err, out)
	}
	out, err := exec.Command(bin, "--version").CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "flowtail "+version+" ") {
		t.Errorf("flowtail --version, built with the Dockerfile's -ldflags and VERSION=%s: %v\n%s", version, err, out)
	}
}
