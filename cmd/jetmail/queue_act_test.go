package main

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jetmail/jetmail/events"
	"github.com/jetmail/jetmail/spool"
)

// lsStates maps queue ID to message state, from `queue ls -o json`.
func lsStates(t *testing.T, url string) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(mustRunQueue(t, url, "ls", "-o", "json")), "\n") {
		if l == "" {
			continue
		}
		var m lsMessage
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatal(err)
		}
		out[m.QueueID] = m.State
	}
	return out
}

func actJSON(t *testing.T, url string, args ...string) actSummary {
	t.Helper()
	var s actSummary
	out := mustRunQueue(t, url, append(args, "-o", "json")...)
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		t.Fatalf("%v: %v\n%s", args, err, out)
	}
	return s
}

func TestQueueHoldReleaseRetryRm(t *testing.T) {
	f := newQueueOfFour(t)
	a, d, m, n := f.active.QueueID, f.deferred.QueueID, f.mixed.QueueID, f.fresh.QueueID

	// hold by ID (lower case works too), text output.
	if got := mustRunQueue(t, f.url, "hold", strings.ToLower(d)); got != "held 1 message\n" {
		t.Errorf("hold: %q", got)
	}
	if got := mustRunQueue(t, f.url, "hold", d); got != "held 0 messages (1 left alone: already held)\n" {
		t.Errorf("hold again: %q", got)
	}
	if st := lsStates(t, f.url); st[d] != stateHeld || st[a] != stateActive || st[m] != stateDeferred || st[n] != stateNew {
		t.Errorf("states after hold: %v", st)
	}
	var stat statOutput
	if err := json.Unmarshal([]byte(mustRunQueue(t, f.url, "stat", "-o", "json")), &stat); err != nil {
		t.Fatal(err)
	}
	if stat.Held != 1 || stat.Messages != 4 {
		t.Errorf("stat after hold: %+v", stat)
	}
	if err := json.Unmarshal([]byte(mustRunQueue(t, f.url, "stat", "--scan", "-o", "json")), &stat); err != nil {
		t.Fatal(err)
	}
	if stat.Held != 1 || stat.Deferred != 1 || stat.Active != 1 || stat.New != 1 {
		t.Errorf("stat --scan after hold: %+v", stat)
	}
	if got := mustRunQueue(t, f.url, "ls", "--state", "held", "-o", "json"); !strings.Contains(got, d) || strings.Count(got, "\n") != 1 {
		t.Errorf("ls --state held: %s", got)
	}

	// Bulk without --yes: counted, not done, and an error for scripts.
	out, err := runQueue(t, f.url, "retry", "--all")
	if err == nil || !strings.Contains(err.Error(), "add --yes") || !strings.HasPrefix(out, "4 messages match; nothing done (add --yes)\n") {
		t.Errorf("retry --all without --yes: %v\n%q", err, out)
	}
	// retry: the deferred message only; held, new and active are left
	// alone, each with its reason.
	s := actJSON(t, f.url, "retry", "--all", "--yes")
	if s.Action != "retry" || s.Matched != 4 || s.Affected != 1 || s.Skipped["held (release them)"] != 1 ||
		s.Skipped["due already (active)"] != 1 || s.Skipped["due already (new)"] != 1 || len(s.Errors) != 0 {
		t.Errorf("retry --all --yes: %+v", s)
	}
	mm, err := f.sp.Find(testCtx(t), m)
	if err != nil || mm.RetryAt.IsZero() || mm.Requeued.IsZero() {
		t.Errorf("the retried record: %+v, %v", mm, err)
	}

	// release by filter: the held one.
	s = actJSON(t, f.url, "release", "--state", "held", "--yes")
	if s.Matched != 1 || s.Affected != 1 {
		t.Errorf("release --state held: %+v", s)
	}
	dm, err := f.sp.Find(testCtx(t), d)
	if err != nil || !dm.Held.IsZero() || dm.RetryAt.IsZero() {
		t.Errorf("the released record: %+v, %v", dm, err)
	}
	if stat, err := f.sp.Stats(testCtx(t)); err != nil || stat.Held != 0 {
		t.Errorf("held after release: %+v, %v", stat, err)
	}

	// rm by filter: every message with a recipient at example.org.
	s = actJSON(t, f.url, "rm", "--domain", "example.org", "--yes")
	if s.Matched != 3 || s.Affected != 3 {
		t.Errorf("rm --domain example.org: %+v", s)
	}
	if st := lsStates(t, f.url); len(st) != 1 || st[d] == "" {
		t.Errorf("left after rm: %v", st)
	}
	if st, err := f.sp.LoadState(testCtx(t), m); st != nil || err != nil {
		t.Errorf("state of removed mail: %+v, %v", st, err)
	}
	// The removed guard stays: rm of a removed message finds nothing.
	out, err = runQueue(t, f.url, "rm", a)
	if err == nil || !strings.Contains(out, "no such message") {
		t.Errorf("rm of removed mail: %v\n%s", err, out)
	}
	// Each change is in the cluster's event log, and in the report.
	// (The tools' clock is fixed in these tests; the events have the
	// real time.)
	got, err := runLogTool(t, f.url, "events", "-o", "json", "--from", time.Now().Add(-time.Hour).UTC().Format(time.RFC3339),
		"--to", time.Now().Add(time.Minute).UTC().Format(time.RFC3339))
	if err != nil {
		t.Fatal(err)
	}
	var kinds []string
	for _, l := range strings.Split(strings.TrimSpace(got), "\n") {
		var ev events.Event
		if err := json.Unmarshal([]byte(l), &ev); err != nil {
			t.Fatalf("%v: %s", err, l)
		}
		if !strings.HasPrefix(ev.Pod, "queue@") || ev.QueueID == "" {
			t.Errorf("admin event %+v", ev)
		}
		kinds = append(kinds, string(ev.Kind)+" "+ev.QueueID)
	}
	want := []string{"held " + d, "retried " + m, "released " + d, "removed " + a, "removed " + m, "removed " + n}
	slices.Sort(kinds)
	slices.Sort(want)
	if !slices.Equal(kinds, want) {
		t.Errorf("events of the actions:\n%v\nwant\n%v", kinds, want)
	}
	if _, err := runQueue(t, f.url, "rm"); err == nil || !strings.Contains(err.Error(), "nothing selected") {
		t.Errorf("rm with no selection: %v", err)
	}
	if _, err := runQueue(t, f.url, "rm", d, "--all"); err == nil {
		t.Error("rm ID --all: accepted")
	}
}

func TestQueueShape(t *testing.T) {
	f := newQueueFixture(t)
	// One message per bucket for a.example, the age just inside it;
	// b.example has two recent ones, one of them also for a.example.
	for _, age := range []time.Duration{time.Minute, 7 * time.Minute, 15 * time.Minute, 30 * time.Minute, 79 * time.Minute,
		100 * time.Minute, 200 * time.Minute, 24 * time.Hour} {
		f.enqueue(t, age, "s@x.example", "Subject: a\r\n\r\na\r\n", false, "r@a.example")
	}
	f.enqueue(t, 2*time.Minute, "s@y.example", "Subject: b\r\n\r\nb\r\n", false, "r@b.example")
	both := f.enqueue(t, 2*time.Minute, "s@y.example", "Subject: ab\r\n\r\nab\r\n", false, "q@b.example", "q@A.example")
	// A recipient delivered already does not count: this one has only
	// its b.example recipient left.
	partly := f.enqueue(t, 6*time.Minute, "", "Subject: c\r\n\r\nc\r\n", false, "x@a.example", "y@b.example")
	f.saveState(t, &spool.DeliveryState{QueueID: partly.QueueID, Attempts: 1, Rcpts: []spool.RcptState{
		{Addr: "x@a.example", Status: spool.RcptDelivered}, {Addr: "y@b.example", Status: spool.RcptDeferred}}})

	var got shapeOutput
	if err := json.Unmarshal([]byte(mustRunQueue(t, f.url, "shape", "-o", "json")), &got); err != nil {
		t.Fatal(err)
	}
	row := func(r shapeRow) string { return fmt.Sprintf("%s %d %v", r.Domain, r.Total, r.Buckets) }
	want := []string{
		"TOTAL 11 [3 2 1 1 1 1 1 1]",
		"a.example 9 [2 1 1 1 1 1 1 1]",
		"b.example 3 [2 1 0 0 0 0 0 0]",
	}
	have := []string{row(got.Total)}
	for _, r := range got.Rows {
		have = append(have, row(r))
	}
	if strings.Join(have, "\n") != strings.Join(want, "\n") || got.Others != nil {
		t.Errorf("shape:\n%s\nwant:\n%s", strings.Join(have, "\n"), strings.Join(want, "\n"))
	}
	_ = both

	text := mustRunQueue(t, f.url, "shape")
	wantText := `            T 5 10 20 40 80 160 320 320+
     TOTAL 11 3  2  1  1  1   1   1    1
 a.example  9 2  1  1  1  1   1   1    1
 b.example  3 2  1  0  0  0   0   0    0
(messages by recipient domain and age in minutes)
`
	if text != wantText {
		t.Errorf("shape text:\n%s\nwant:\n%s", text, wantText)
	}

	// By sender domain, the top one and the rest.
	if err := json.Unmarshal([]byte(mustRunQueue(t, f.url, "shape", "--senders", "--top", "1", "-o", "json")), &got); err != nil {
		t.Fatal(err)
	}
	if len(got.Rows) != 1 || row(got.Rows[0]) != "x.example 8 [1 1 1 1 1 1 1 1]" || got.Others == nil || got.Others.Total != 3 {
		t.Errorf("shape --senders --top 1: %+v others %+v", got.Rows, got.Others)
	}
	// The ls filters select: mail older than an hour.
	if err := json.Unmarshal([]byte(mustRunQueue(t, f.url, "shape", "--min-age", "1h", "-o", "json")), &got); err != nil {
		t.Fatal(err)
	}
	if row(got.Total) != "TOTAL 4 [0 0 0 0 1 1 1 1]" {
		t.Errorf("shape --min-age 1h: %s", row(got.Total))
	}
}
