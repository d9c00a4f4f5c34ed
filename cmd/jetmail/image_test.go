package main

import (
	"bufio"
	"context"
	"debug/buildinfo"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/jetmail/jetmail/internal/natstest"
	"github.com/jetmail/jetmail/internal/smtptest"
	"github.com/jetmail/jetmail/spool"
)

// dockerfilePath is the image's Dockerfile; the test reads the file itself.
const dockerfilePath = "../../Dockerfile"

// imageUID is distroless's nonroot user and group (the Helm chart's
// securityContext uses the same IDs).
const imageUID = 65532

// TestImageBinaryRunsAsNonRootAndWritesNothing tests what the container
// image would do, as far as it can be tested without a container engine:
//
//   - it builds the binary with the Dockerfile's own `go build` RUN line
//     (its environment and flags, parsed from the file, so a change there
//     is a change here; only the output path differs) and checks it is
//     static: no ELF interpreter, no DT_NEEDED libraries, so it runs on
//     distroless static, which has no libc;
//   - it checks the final stage is gcr.io/distroless/static, runs as
//     nonroot (65532), copies the binary the RUN line builds and starts it;
//   - it runs that binary's gateway role as uid/gid 65532 with no
//     capabilities, in a mount namespace where every file system is
//     read-only (Kubernetes' readOnlyRootFilesystem, and stricter: /tmp
//     too), its working directory, HOME and TMPDIR root-owned mode 0555
//     directories, against an in-process NATS JetStream server; it must
//     become ready, take one message over SMTP with a 250 that lands in
//     JETMAIL_QUEUE, and exit 0 on SIGTERM;
//   - "writes nothing": while it runs, its open descriptors (sampled from
//     /proc every few milliseconds) are never a file opened for writing,
//     only sockets, pipes, anonymous inodes and character devices; its
//     kernel block-output count (rusage) is 0 when it exits; its working
//     directory, HOME and TMPDIR are still empty; its log reports no
//     refused write.
func TestImageBinaryRunsAsNonRootAndWritesNothing(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary as the Dockerfile does")
	}
	df := parseDockerfile(t, dockerfilePath)

	// 3. The final stage: distroless static, nonroot, running the binary
	// the build stage's RUN line writes.
	final := df.stages[len(df.stages)-1]
	if !strings.HasPrefix(final.image, "gcr.io/distroless/static") {
		t.Errorf("final stage is FROM %s, want gcr.io/distroless/static (no shell, no libc: the binary must be static)", final.image)
	}
	user := final.last("USER")
	if user == "" {
		t.Errorf("final stage has no USER; the image must not run as root (want USER nonroot:nonroot, i.e. %d:%d)", imageUID, imageUID)
	} else if !isNonroot(user) {
		t.Errorf("final stage has USER %s, want nonroot:nonroot (%d:%d)", user, imageUID, imageUID)
	}

	run, runStage := df.goBuildRun(t)
	buildEnv, buildArgs, outPath := parseGoBuild(t, run, runStage)
	copied := ""
	for _, c := range final.all("COPY") {
		from, paths := "", []string(nil)
		for _, w := range strings.Fields(c) {
			if v, ok := strings.CutPrefix(w, "--from="); ok {
				from = v
			} else if !strings.HasPrefix(w, "--") {
				paths = append(paths, w)
			}
		}
		if from != "" && len(paths) == 2 && paths[0] == outPath {
			if from != runStage.name && from != strconv.Itoa(runStage.index) {
				t.Errorf("final stage copies %s from stage %q, but the go build RUN line is in stage %q", outPath, from, runStage.name)
			}
			copied = paths[1]
		}
	}
	if copied == "" {
		t.Errorf("final stage has no `COPY --from=%s %s <dest>`: the binary the RUN line builds is not in the image", runStage.name, outPath)
	} else if ep := final.last("ENTRYPOINT"); !strings.HasPrefix(strings.TrimSpace(ep), `["`+copied+`"`) {
		t.Errorf("final stage ENTRYPOINT is %s, want it to start %s", ep, copied)
	}

	// 1. Build as the Dockerfile does.
	binDir := t.TempDir()
	bin := filepath.Join(binDir, "jetmail")
	for i, a := range buildArgs {
		if a == "\x00out" {
			buildArgs[i] = bin
		}
	}
	repoRoot, err := filepath.Abs(filepath.Dir(dockerfilePath))
	if err != nil {
		t.Fatal(err)
	}
	// -trimpath compiles every package apart from ordinary builds, so the
	// first run builds the whole tree: stop in time to say so rather than
	// be killed by go test's -timeout.
	buildCtx := context.Background()
	if dl, ok := t.Deadline(); ok {
		var cancel context.CancelFunc
		buildCtx, cancel = context.WithDeadline(buildCtx, dl.Add(-time.Until(dl)/10))
		defer cancel()
	}
	build := exec.CommandContext(buildCtx, "go", buildArgs...)
	build.Dir = repoRoot // the build stage's WORKDIR holds `COPY . .`
	// The build context excludes .git (.dockerignore), so the image's
	// binary has no VCS stamp: -buildvcs=false is the same here.
	build.Env = append(append(os.Environ(), "GOFLAGS="+strings.TrimSpace(os.Getenv("GOFLAGS")+" -buildvcs=false")), buildEnv...)
	t.Logf("Dockerfile build: %s go %s (in %s, output %s instead of %s)", strings.Join(buildEnv, " "), strings.Join(buildArgs, " "), repoRoot, bin, outPath)
	start := time.Now()
	if out, err := build.CombinedOutput(); buildCtx.Err() != nil {
		t.Fatalf("the Dockerfile's go build did not finish in %v, 90%% of the time go test allows (-trimpath builds the whole tree once, uncached; rerun, or give -timeout 30m): %v\n%s", time.Since(start).Round(time.Second), err, out)
	} else if err != nil {
		t.Fatalf("the Dockerfile's go build failed: %v\n%s", err, out)
	}
	t.Logf("built in %v", time.Since(start).Round(time.Millisecond))

	// 2. Static: nothing for a dynamic loader to do.
	checkStatic(t, bin)
	if bi, err := buildinfo.ReadFile(bin); err == nil {
		var settings []string
		for _, s := range bi.Settings {
			settings = append(settings, s.Key+"="+s.Value)
		}
		t.Logf("build settings: %s", strings.Join(settings, " "))
	}
	if t.Failed() {
		t.FailNow()
	}

	// 4. Run it as the image would.
	if os.Geteuid() != 0 {
		t.Skip("running the binary as uid 65532 needs root (to switch user); the Dockerfile and static checks passed")
	}
	// The binary is root's, mode 0755, in directories nonroot can enter
	// but not change, as /jetmail is in the image.
	for _, d := range []string{binDir, filepath.Dir(binDir)} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	mustTraverse(t, binDir)
	// Working directory, HOME and TMPDIR: root's, mode 0555.
	box := t.TempDir()
	if err := os.Chmod(box, 0o755); err != nil {
		t.Fatal(err)
	}
	mustTraverse(t, box)
	workDir, homeDir, tmpDir := filepath.Join(box, "work"), filepath.Join(box, "home"), filepath.Join(box, "tmp")
	for _, d := range []string{workDir, homeDir, tmpDir} {
		if err := os.Mkdir(d, 0o555); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(d, 0o555); err != nil { // past the umask
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for _, d := range []string{workDir, homeDir, tmpDir} {
			os.Chmod(d, 0o755) // so that t.TempDir's removal works whatever is left
		}
	})

	ns := natstest.Start(t, natstest.Options{})
	smtpAddr, metricsAddr := freePort(t), freePort(t)
	var log syncBuffer
	cmd := exec.Command(bin, "gateway", "--nats-url", ns.ClientURL(), "--replicas", "1",
		"--smtp-listen", smtpAddr, "--metrics-listen", metricsAddr, "--hostname", "image.test")
	cmd.Dir = workDir
	// distroless static's environment, with HOME and TMPDIR unwritable.
	cmd.Env = []string{
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
		"HOME=" + homeDir,
		"TMPDIR=" + tmpDir,
	}
	cmd.Stdout, cmd.Stderr = &log, &log
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential: &syscall.Credential{Uid: imageUID, Gid: imageUID, Groups: []uint32{}},
		// No Pdeathsig: it follows the forking thread, which startReadOnly
		// throws away at once. t.Cleanup kills the process instead.
	}
	readOnly, err := startReadOnly(cmd)
	if cmd.Process == nil {
		t.Fatalf("start %s: %v", bin, err)
	}
	if !readOnly {
		t.Logf("no read-only mount namespace here (%v); relying on the 0555 directories, the descriptor scan and rusage", err)
	}
	pid := cmd.Process.Pid
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		select {
		case <-exited:
			return
		default:
		}
		cmd.Process.Kill()
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			t.Errorf("gateway pid %d did not die after SIGKILL", pid)
		}
	})
	mon := watchFDs(pid, exited)
	defer mon.stop()

	deadline := time.Now().Add(30 * time.Second)
	for {
		code, body := readyzBody(metricsAddr)
		if code == http.StatusOK && strings.TrimSpace(body) == "ok" {
			break
		}
		select {
		case <-exited:
			t.Fatalf("gateway exited (%v) before it was ready; log:\n%s", waitErr, log.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("gateway not ready within 30s (last /readyz: %d %q); log:\n%s", code, body, log.String())
		}
		time.Sleep(50 * time.Millisecond)
	}

	checkProcStatus(t, pid)
	if readOnly {
		checkMountsReadOnly(t, pid)
	}

	// One message over real SMTP, into JetStream.
	c := smtptest.DialReady(t, smtpAddr)
	reply := c.Mail("alice@example.org", []string{"bob@example.net"},
		"From: alice@example.org\r\nTo: bob@example.net\r\nMessage-ID: <image-1@example.org>\r\nSubject: from the image\r\n\r\nstatic, nonroot, read-only\r\n", 250)
	if !strings.HasPrefix(reply, "250 ") {
		t.Fatalf("DATA reply %q, want 250", reply)
	}
	c.Cmd("QUIT", 221)
	c.Close()
	t.Logf("SMTP: %s", reply)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	js, err := jetstream.New(natstest.Connect(t, ns))
	if err != nil {
		t.Fatal(err)
	}
	st, err := js.Stream(ctx, spool.QueueStream)
	if err != nil {
		t.Fatalf("stream %s: %v", spool.QueueStream, err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		t.Fatalf("stream %s info: %v", spool.QueueStream, err)
	}
	if info.State.Msgs != 1 {
		t.Fatalf("stream %s holds %d messages, want 1", spool.QueueStream, info.State.Msgs)
	}

	// A last look while it runs, then SIGTERM.
	mon.sampleNow()
	checkProcStatus(t, pid)
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-exited:
	case <-time.After(30 * time.Second):
		t.Fatalf("gateway did not exit within 30s of SIGTERM; log:\n%s", log.String())
	}
	if waitErr != nil {
		t.Fatalf("gateway exited with %v after SIGTERM, want 0; log:\n%s", waitErr, log.String())
	}
	mon.stop()

	// 5. It wrote nothing.
	samples, seen, violations := mon.result()
	if samples < 3 {
		t.Errorf("only %d samples of /proc/%d/fd while it ran", samples, pid)
	}
	for _, v := range violations {
		t.Errorf("open for writing: %s", v)
	}
	t.Logf("%d samples of /proc/%d/fd; descriptors seen: %s", samples, pid, strings.Join(seen, ", "))
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		if ru.Oublock != 0 {
			t.Errorf("rusage: %d block output operations, want 0 (the process wrote to a file system)", ru.Oublock)
		}
		t.Logf("rusage: %d block output operations, max RSS %d KiB", ru.Oublock, ru.Maxrss)
	}
	for _, d := range []string{workDir, homeDir, tmpDir} {
		var found []string
		filepath.WalkDir(d, func(p string, e fs.DirEntry, err error) error {
			if err != nil {
				found = append(found, fmt.Sprintf("%s (%v)", p, err))
			} else if p != d {
				found = append(found, p)
			}
			return nil
		})
		if len(found) > 0 {
			t.Errorf("the gateway created %v", found)
		}
		if fi, err := os.Stat(d); err != nil || fi.Mode().Perm() != 0o555 {
			t.Errorf("%s: %v, mode changed from 0555", d, err)
		}
	}
	for _, bad := range []string{"read-only file system", "permission denied", "operation not permitted"} {
		if strings.Contains(strings.ToLower(log.String()), bad) {
			t.Errorf("the gateway's log reports %q: it tried to write somewhere; log:\n%s", bad, log.String())
		}
	}
	if !strings.Contains(log.String(), `"msg":"transaction"`) {
		t.Errorf("no transaction line in the log:\n%s", log.String())
	}
}

// dockerfile is the instructions of a Dockerfile, by stage.
type dockerfile struct{ stages []*dockerStage }

type dockerStage struct {
	index       int
	name, image string
	instrs      [][2]string // instruction (upper case), arguments
}

func (s *dockerStage) all(instr string) []string {
	var out []string
	for _, in := range s.instrs {
		if in[0] == instr {
			out = append(out, in[1])
		}
	}
	return out
}

func (s *dockerStage) last(instr string) string {
	a := s.all(instr)
	if len(a) == 0 {
		return ""
	}
	return a[len(a)-1]
}

// parseDockerfile splits path into instructions (joining continued lines,
// dropping comments) and the instructions into stages.
func parseDockerfile(t *testing.T, path string) *dockerfile {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatalf("read the Dockerfile: %v", err)
	}
	defer f.Close()
	var logical []string
	var cur strings.Builder
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if strings.HasPrefix(line, "#") || (line == "" && cur.Len() == 0) {
			continue
		}
		if l, ok := strings.CutSuffix(line, `\`); ok {
			cur.WriteString(l + " ")
			continue
		}
		cur.WriteString(line)
		if s := strings.TrimSpace(cur.String()); s != "" {
			logical = append(logical, s)
		}
		cur.Reset()
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if s := strings.TrimSpace(cur.String()); s != "" {
		logical = append(logical, s)
	}
	df := &dockerfile{}
	for _, l := range logical {
		instr, args, _ := strings.Cut(l, " ")
		instr, args = strings.ToUpper(instr), strings.TrimSpace(args)
		if instr == "FROM" {
			st := &dockerStage{index: len(df.stages)}
			var words []string
			for _, w := range strings.Fields(args) {
				if !strings.HasPrefix(w, "--") {
					words = append(words, w)
				}
			}
			if len(words) == 0 {
				t.Fatalf("Dockerfile: FROM without an image: %q", l)
			}
			st.image = words[0]
			if len(words) == 3 && strings.EqualFold(words[1], "AS") {
				st.name = words[2]
			}
			df.stages = append(df.stages, st)
			continue
		}
		if len(df.stages) == 0 {
			continue // ARG before the first FROM
		}
		st := df.stages[len(df.stages)-1]
		st.instrs = append(st.instrs, [2]string{instr, args})
	}
	if len(df.stages) == 0 {
		t.Fatalf("Dockerfile %s has no FROM", path)
	}
	return df
}

// goBuildRun finds the one RUN instruction with `go build` and its stage.
func (df *dockerfile) goBuildRun(t *testing.T) (string, *dockerStage) {
	t.Helper()
	var runs []string
	var stage *dockerStage
	for _, st := range df.stages {
		for _, in := range st.instrs {
			if in[0] == "RUN" && strings.Contains(in[1], "go build") {
				runs = append(runs, in[1])
				stage = st
			}
		}
	}
	switch len(runs) {
	case 0:
		t.Fatalf("Dockerfile: no RUN line with `go build` (expected `RUN CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH go build ... -o /jetmail ./cmd/jetmail` in the build stage); this test builds the binary with that line")
	case 1:
	default:
		t.Fatalf("Dockerfile: %d RUN lines with `go build`, this test knows how to follow one: %q", len(runs), runs)
	}
	return runs[0], stage
}

// parseGoBuild turns the RUN line's shell command into the environment and
// arguments of `go`, with the -o argument replaced by "\x00out" and the
// path it had returned. Build arguments become what they would be for an
// image of this machine's platform.
func parseGoBuild(t *testing.T, run string, st *dockerStage) (env, args []string, out string) {
	t.Helper()
	if strings.HasPrefix(run, "[") {
		t.Fatalf("Dockerfile: the go build RUN line is in exec form (%s); this test reads the shell form", run)
	}
	vars := map[string]string{
		"TARGETOS": runtime.GOOS, "TARGETARCH": runtime.GOARCH, "TARGETPLATFORM": runtime.GOOS + "/" + runtime.GOARCH,
		"BUILDOS": runtime.GOOS, "BUILDARCH": runtime.GOARCH, "BUILDPLATFORM": runtime.GOOS + "/" + runtime.GOARCH,
	}
	for _, a := range st.all("ARG") {
		for _, w := range strings.Fields(a) {
			if k, v, ok := strings.Cut(w, "="); ok {
				vars[k] = strings.Trim(v, `"'`)
			}
		}
	}
	words, err := shellWords(run, vars)
	if err != nil {
		t.Fatalf("Dockerfile: go build RUN line %q: %v", run, err)
	}
	// The command of the line that runs go build (`a && b` runs both).
	var cmd []string
	for seg := range splitSegments(words) {
		if len(seg) > 0 && slices.Contains(seg, "go") && slices.Contains(seg, "build") {
			cmd = seg
		}
	}
	i := 0
	for ; i < len(cmd) && strings.Contains(cmd[i], "=") && !strings.HasPrefix(cmd[i], "-"); i++ {
		env = append(env, cmd[i])
	}
	if i+1 >= len(cmd) || cmd[i] != "go" || cmd[i+1] != "build" {
		t.Fatalf("Dockerfile: cannot read `[VAR=value ...] go build ...` in the RUN line %q", run)
	}
	args = append([]string{"build"}, cmd[i+2:]...)
	for j := 1; j < len(args); j++ {
		switch {
		case args[j] == "-o" && j+1 < len(args):
			out, args[j+1] = args[j+1], "\x00out"
		case strings.HasPrefix(args[j], "-o="):
			out, args[j] = strings.TrimPrefix(args[j], "-o="), "-o"
			args = slices.Insert(args, j+1, "\x00out")
		}
	}
	if out == "" {
		t.Fatalf("Dockerfile: the go build RUN line %q has no -o: where does the binary go?", run)
	}
	return env, args, out
}

// shellWords splits a shell command into words with quotes removed and
// variables expanded from vars; an unknown variable or a command
// substitution is an error (the test would not run what Docker runs).
func shellWords(s string, vars map[string]string) ([]string, error) {
	var words []string
	var w strings.Builder
	inWord := false
	quote := byte(0)
	for i := 0; i < len(s); i++ {
		ch := s[i]
		switch {
		case quote == '\'':
			if ch == '\'' {
				quote = 0
			} else {
				w.WriteByte(ch)
			}
			continue
		case ch == '\\' && i+1 < len(s):
			i++
			w.WriteByte(s[i])
			inWord = true
			continue
		case ch == '$':
			name := ""
			switch {
			case i+1 < len(s) && s[i+1] == '(':
				return nil, fmt.Errorf("command substitution %q is more than this test interprets", s[i:])
			case i+1 < len(s) && s[i+1] == '{':
				end := strings.IndexByte(s[i:], '}')
				if end < 0 {
					return nil, errors.New("unterminated ${")
				}
				name, i = s[i+2:i+end], i+end
				if strings.ContainsAny(name, ":-+?#%/") {
					return nil, fmt.Errorf("shell expansion ${%s} is more than this test interprets", name)
				}
			default:
				j := i + 1
				for j < len(s) && (s[j] == '_' || s[j] >= 'A' && s[j] <= 'Z' || s[j] >= 'a' && s[j] <= 'z' || s[j] >= '0' && s[j] <= '9') {
					j++
				}
				name, i = s[i+1:j], j-1
			}
			v, ok := vars[name]
			if !ok {
				return nil, fmt.Errorf("variable $%s: neither a platform build argument nor an ARG with a default", name)
			}
			w.WriteString(v)
			inWord = true
			continue
		case quote == '"':
			if ch == '"' {
				quote = 0
			} else {
				w.WriteByte(ch)
			}
			continue
		case ch == '\'' || ch == '"':
			quote, inWord = ch, true
			continue
		case ch == '`':
			return nil, errors.New("command substitution is more than this test interprets")
		case ch == ' ' || ch == '\t' || ch == '\n':
			if inWord {
				words = append(words, w.String())
				w.Reset()
				inWord = false
			}
			continue
		case ch == ';' || ch == '&' || ch == '|':
			if inWord {
				words = append(words, w.String())
				w.Reset()
				inWord = false
			}
			op := string(ch)
			if i+1 < len(s) && (s[i+1] == '&' || s[i+1] == '|') {
				op += string(s[i+1])
				i++
			}
			if op != "&&" && op != ";" {
				return nil, fmt.Errorf("shell operator %q is more than this test interprets", op)
			}
			words = append(words, "\x00"+op)
			continue
		}
		w.WriteByte(ch)
		inWord = true
	}
	if quote != 0 {
		return nil, errors.New("unterminated quote")
	}
	if inWord {
		words = append(words, w.String())
	}
	return words, nil
}

// splitSegments yields the commands between && and ;.
func splitSegments(words []string) func(func([]string) bool) {
	return func(yield func([]string) bool) {
		start := 0
		for i, w := range words {
			if strings.HasPrefix(w, "\x00") {
				if !yield(words[start:i]) {
					return
				}
				start = i + 1
			}
		}
		yield(words[start:])
	}
}

func isNonroot(user string) bool {
	u, g, _ := strings.Cut(user, ":")
	ok := func(s string) bool { return s == "nonroot" || s == strconv.Itoa(imageUID) }
	return ok(u) && (g == "" || ok(g))
}

// checkStatic fails unless bin is an ELF file a kernel runs without a
// dynamic loader or shared libraries.
func checkStatic(t *testing.T, bin string) {
	t.Helper()
	f, err := elf.Open(bin)
	if err != nil {
		t.Fatalf("%s is not ELF: %v", bin, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			interp, _ := io.ReadAll(p.Open())
			t.Errorf("binary has a PT_INTERP program header (%q): it is dynamically linked and will not start on distroless static", strings.TrimRight(string(interp), "\x00"))
		}
	}
	libs, err := f.ImportedLibraries()
	if err != nil {
		t.Fatalf("read DT_NEEDED: %v", err)
	}
	if len(libs) > 0 {
		t.Errorf("binary needs shared libraries %v (DT_NEEDED); distroless static has none", libs)
	}
	if f.Type != elf.ET_EXEC && f.Type != elf.ET_DYN {
		t.Errorf("ELF type %v, want an executable", f.Type)
	}
}

// mustTraverse fails unless every directory from / down to dir lets
// others search it, as uid 65532 must to reach the files in it.
func mustTraverse(t *testing.T, dir string) {
	t.Helper()
	for d := dir; ; d = filepath.Dir(d) {
		fi, err := os.Stat(d)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm()&0o001 == 0 {
			t.Fatalf("%s (mode %v) is not searchable by others, so uid %d cannot reach %s; set TMPDIR to a directory that is", d, fi.Mode().Perm(), imageUID, dir)
		}
		if d == filepath.Dir(d) {
			return
		}
	}
}

// startReadOnly starts cmd in a new mount namespace in which every mount
// is read-only, created on a locked thread that is then thrown away (the
// test's own threads keep the ordinary view). When the namespace cannot be
// made (no CAP_SYS_ADMIN), it starts cmd as it is and reports false, with
// the reason as the error; cmd then runs if cmd.Process is set.
func startReadOnly(cmd *exec.Cmd) (bool, error) {
	type result struct {
		readOnly bool
		nsErr    error
		err      error
	}
	res := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		// Never unlocked: the thread ends with this goroutine.
		nsErr := readOnlyNamespace()
		if nsErr != nil {
			res <- result{nsErr: nsErr}
			return
		}
		res <- result{readOnly: true, err: cmd.Start()}
	}()
	r := <-res
	if r.nsErr != nil {
		if err := cmd.Start(); err != nil {
			return false, err
		}
		return false, r.nsErr
	}
	return true, r.err
}

// readOnlyNamespace moves the calling (locked) thread into a private mount
// namespace and remounts every mount in it read-only.
func readOnlyNamespace() error {
	if err := syscall.Unshare(syscall.CLONE_NEWNS); err != nil {
		return fmt.Errorf("unshare mount namespace: %w", err)
	}
	if err := syscall.Mount("", "/", "", syscall.MS_REC|syscall.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make mounts private: %w", err)
	}
	mi, err := os.ReadFile("/proc/thread-self/mountinfo")
	if err != nil {
		return err
	}
	flagOf := map[string]uintptr{"nosuid": syscall.MS_NOSUID, "nodev": syscall.MS_NODEV, "noexec": syscall.MS_NOEXEC,
		"noatime": syscall.MS_NOATIME, "nodiratime": syscall.MS_NODIRATIME, "relatime": syscall.MS_RELATIME, "strictatime": syscall.MS_STRICTATIME}
	for _, line := range strings.Split(strings.TrimSpace(string(mi)), "\n") {
		f := strings.Fields(line)
		if len(f) < 6 {
			continue
		}
		mp := unescapeMount(f[4])
		flags := uintptr(syscall.MS_BIND | syscall.MS_REMOUNT | syscall.MS_RDONLY)
		for _, o := range strings.Split(f[5], ",") {
			flags |= flagOf[o]
		}
		if err := syscall.Mount("", mp, "", flags, ""); err != nil && !errors.Is(err, syscall.ENOENT) {
			return fmt.Errorf("remount %s read-only: %w", mp, err)
		}
	}
	return nil
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// checkMountsReadOnly fails unless every mount pid sees is read-only.
func checkMountsReadOnly(t *testing.T, pid int) {
	t.Helper()
	mi, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", pid))
	if err != nil {
		t.Fatal(err)
	}
	var mounts [][]string
	for _, line := range strings.Split(strings.TrimSpace(string(mi)), "\n") {
		if f := strings.Fields(line); len(f) >= 6 {
			mounts = append(mounts, f)
		}
	}
	// A mount with another mounted on top of it at the same place (here
	// /dev/shm and /dev/pts, mounted twice) cannot be reached by any path.
	hidden := func(f []string) bool {
		return slices.ContainsFunc(mounts, func(g []string) bool { return g[4] == f[4] && g[1] == f[0] })
	}
	n := 0
	for _, f := range mounts {
		if hidden(f) {
			continue
		}
		n++
		if !slices.Contains(strings.Split(f[5], ","), "ro") {
			t.Errorf("the gateway sees %s mounted %s, want read-only", f[4], f[5])
		}
	}
	if n == 0 {
		t.Errorf("no mounts in /proc/%d/mountinfo", pid)
	}
}

// checkProcStatus fails unless pid runs as 65532:65532 with no
// supplementary groups and no capabilities.
func checkProcStatus(t *testing.T, pid int) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatalf("read /proc/%d/status: %v", pid, err)
	}
	fields := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			fields[k] = strings.TrimSpace(v)
		}
	}
	id := strconv.Itoa(imageUID)
	for _, k := range []string{"Uid", "Gid"} {
		if got := strings.Fields(fields[k]); len(got) != 4 || slices.ContainsFunc(got, func(s string) bool { return s != id }) {
			t.Errorf("/proc/%d/status %s: %q, want real, effective, saved and fs all %s", pid, k, fields[k], id)
		}
	}
	if g := fields["Groups"]; g != "" && g != id {
		t.Errorf("/proc/%d/status Groups: %q, want none", pid, g)
	}
	for _, k := range []string{"CapInh", "CapPrm", "CapEff", "CapAmb"} {
		if v := fields[k]; strings.Trim(v, "0") != "" {
			t.Errorf("/proc/%d/status %s: %s, want no capabilities", pid, k, v)
		}
	}
}

func readyzBody(addr string) (int, string) {
	c := http.Client{Timeout: 3 * time.Second}
	resp, err := c.Get("http://" + addr + "/readyz")
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	return resp.StatusCode, string(b)
}

// fdWatch samples a process's open descriptors until it exits or stop is
// called, and records every one open for writing that is not a socket,
// pipe, anonymous inode (eventpoll, eventfd, ...) or character device.
type fdWatch struct {
	pid      int
	mu       sync.Mutex
	samples  int
	seen     map[string]bool
	bad      map[string]bool
	quit     chan struct{}
	done     chan struct{}
	stopOnce sync.Once
}

func watchFDs(pid int, exited <-chan struct{}) *fdWatch {
	w := &fdWatch{pid: pid, seen: map[string]bool{}, bad: map[string]bool{}, quit: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-exited:
				return
			case <-w.quit:
				return
			case <-tick.C:
				w.sampleNow()
			}
		}
	}()
	return w
}

func (w *fdWatch) sampleNow() {
	dir := fmt.Sprintf("/proc/%d/fd", w.pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return // exited
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.samples++
	for _, e := range ents {
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			continue // closed meanwhile
		}
		kind, _, _ := strings.Cut(target, ":")
		switch kind {
		case "socket", "pipe", "anon_inode":
			w.seen[kind] = true
			continue
		}
		info, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", w.pid, e.Name()))
		if err != nil {
			continue
		}
		var flags uint64
		for _, line := range strings.Split(string(info), "\n") {
			if v, ok := strings.CutPrefix(line, "flags:"); ok {
				flags, _ = strconv.ParseUint(strings.TrimSpace(v), 8, 64)
			}
		}
		mode := "r"
		if flags&syscall.O_ACCMODE != syscall.O_RDONLY {
			mode = "w"
		}
		w.seen[target+" ("+mode+")"] = true
		if mode == "r" {
			continue
		}
		if fi, err := os.Stat(target); err == nil && fi.Mode()&fs.ModeCharDevice != 0 {
			continue
		}
		w.bad[fmt.Sprintf("fd %s -> %s (flags %o)", e.Name(), target, flags)] = true
	}
}

func (w *fdWatch) stop() {
	w.stopOnce.Do(func() { close(w.quit) })
	<-w.done
}

func (w *fdWatch) result() (samples int, seen, bad []string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for k := range w.seen {
		seen = append(seen, k)
	}
	for k := range w.bad {
		bad = append(bad, k)
	}
	sort.Strings(seen)
	sort.Strings(bad)
	return w.samples, seen, bad
}
