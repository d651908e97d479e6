package flowstat_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/flowbus/flowbus/consumers/flowstat/store"
)

// grafanaMacros replaces the Grafana PostgreSQL macros of a panel's SQL as Grafana expands them for a
// time range [from, to] and a 1m interval, and $host by the values of the host variable (what "All"
// sends).
func grafanaMacros(q string, from, to time.Time, hosts []string) string {
	ts := func(t time.Time) string { return "'" + t.UTC().Format(time.RFC3339) + "'" }
	q = regexp.MustCompile(`\$__timeFilter\(([^)]*)\)`).ReplaceAllString(q, "$1 BETWEEN "+ts(from)+" AND "+ts(to))
	q = regexp.MustCompile(`\$__timeGroupAlias\(([^,]*),[^)]*\)`).ReplaceAllString(q, `floor(extract(epoch from $1)/60)*60 AS "time"`)
	q = regexp.MustCompile(`\$__timeGroup\(([^,]*),[^)]*\)`).ReplaceAllString(q, `floor(extract(epoch from $1)/60)*60`)
	q = strings.NewReplacer("$__timeFrom()", ts(from), "$__timeTo()", ts(to), "$__interval", "'1m'").Replace(q)
	quoted := make([]string, len(hosts))
	for i, h := range hosts {
		quoted[i] = "'" + strings.ReplaceAll(h, "'", "''") + "'"
	}
	return strings.ReplaceAll(q, "$host", strings.Join(quoted, ","))
}

// Every panel of deploy/grafana/flows.json runs, its macros expanded as Grafana does, against a real
// PostgreSQL holding what flowstat wrote from published begins and ends, and returns rows; each reads
// the analyst views only (not the tables, whose form is flowstat's business) on the dashboard's
// PostgreSQL data source variable.
func TestFlowsDashboardQueries(t *testing.T) {
	raw, err := os.ReadFile("../../deploy/grafana/flows.json")
	if err != nil {
		t.Fatal(err)
	}
	type target struct {
		RefID      string `json:"refId"`
		RawSQL     string `json:"rawSql"`
		Format     string `json:"format"`
		Datasource struct {
			Type string `json:"type"`
			UID  string `json:"uid"`
		} `json:"datasource"`
	}
	var d struct {
		UID, Title string
		Panels     []struct {
			ID      int      `json:"id"`
			Type    string   `json:"type"`
			Title   string   `json:"title"`
			Targets []target `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Name, Type string
				Query      any `json:"query"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(raw, &d); err != nil {
		t.Fatalf("flows.json: %v", err)
	}
	st := sqlScenario(t)
	ctx := context.Background()
	db := st.DB()
	views := store.ViewNames()
	from, to := time.Now().Add(-6*time.Hour), time.Now().Add(time.Minute)

	readsViews := func(where, q string) {
		for _, m := range regexp.MustCompile(`(?i)\b(?:FROM|JOIN)\s+([a-z_]+)`).FindAllStringSubmatch(q, -1) {
			if !slices.Contains(views, m[1]) {
				t.Errorf("%s reads %s, not one of the views %v", where, m[1], views)
			}
		}
	}
	var hosts []string
	for _, v := range d.Templating.List {
		if v.Name != "host" {
			continue
		}
		q, _ := v.Query.(string)
		readsViews("variable host", q)
		rows, err := db.QueryContext(ctx, q)
		if err != nil {
			t.Fatalf("variable host: %v", err)
		}
		for rows.Next() {
			var h string
			rows.Scan(&h)
			hosts = append(hosts, h)
		}
		rows.Close()
	}
	if !slices.Equal(hosts, []string{"db-01", "web-07"}) {
		t.Fatalf("variable host lists %v, want db-01 web-07", hosts)
	}
	want := map[string]bool{"Top talkers": true, "Connections per host": true, "New destinations": true, "Bytes per peer": true,
		"Events lost by the agents": true, "Gaps": true}
	queried := 0
	for _, p := range d.Panels {
		if p.Type == "row" {
			continue
		}
		delete(want, p.Title)
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			where := fmt.Sprintf("panel %q (%s)", p.Title, tg.RefID)
			if tg.Datasource.UID != "${datasource}" || tg.Datasource.Type != "grafana-postgresql-datasource" {
				t.Errorf("%s: data source %+v, want the PostgreSQL data source variable", where, tg.Datasource)
			}
			readsViews(where, tg.RawSQL)
			q := grafanaMacros(tg.RawSQL, from, to, hosts)
			if strings.Contains(q, "$") {
				t.Errorf("%s: a macro or variable is left unexpanded:\n%s", where, q)
				continue
			}
			rows, err := db.QueryContext(ctx, q)
			if err != nil {
				t.Errorf("%s: %v\n%s", where, err, q)
				continue
			}
			cols, _ := rows.Columns()
			n := 0
			for rows.Next() {
				n++
			}
			if err := rows.Err(); err != nil {
				t.Errorf("%s: %v", where, err)
			}
			rows.Close()
			if n == 0 {
				t.Errorf("%s: no rows on data that has some:\n%s", where, q)
			}
			if tg.Format == "time_series" && (len(cols) < 2 || cols[0] != "time") {
				t.Errorf("%s: a time series must start with a column named time, has %v", where, cols)
			}
			queried++
		}
	}
	if len(want) > 0 {
		t.Errorf("panels missing: %v", want)
	}
	if queried < 8 {
		t.Errorf("only %d panel queries ran", queried)
	}
}
