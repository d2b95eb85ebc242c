// Command cnibench drives CNI chains through libcni in-process (as containerd and CRI-O do) and
// makes metadata requests from inside the pods it creates, timing both with CLOCK_MONOTONIC so
// that its numbers line up with the STS proxy's. It is scripts/bench's load and timing tool;
// bench/*.py runs it inside the bench's node namespace and reads its JSON.
//
//	cnibench cost   --conflist NAME=FILE --conflist NAME=FILE --pods N [--batch B]
//	    ADD then DEL of N pods per chain, chains alternating batch by batch; per-call times.
//	cnibench first  --conflist FILE --pods N --role ROLE [--cached K]
//	    one pod at a time: ADD, then at once the first credential GET from the pod, then K
//	    cached GETs timed the same way; DEL.
//	cnibench burst  --conflist FILE --pods P --per-pod C --role ROLE
//	    ADD P pods; open C connections per pod and send a credential GET on each; print the
//	    event line {"event":"sent"}; read every answer; DEL.
//	cnibench hold   --conflist FILE --spec FILE
//	    ADD the pods listed in FILE ([{namespace,name,role}]); print {"event":"ready"}; then
//	    for each stdin line "request": one credential GET per pod, printed as an event;
//	    on "delete" or EOF: DEL everything.
//	cnibench probe  --target NETNS... --path PATH --rate R --count N [--keepalive]
//	    fixed-rate GETs from inside existing pod namespaces; every latency.
//	cnibench churn  --conflist FILE --spec FILE --workers W --seconds S --max-cycles M
//	    W workers each loop: netns add, ADD, K validated GETs, DEL, netns del; meanwhile the
//	    steady pods of the spec answer a rate-limited request stream.
//
// Every mode prints one JSON result as its last stdout line. Pod namespaces are named
// <netns-prefix>-<n> and removed on every exit path this process controls (errors, SIGTERM);
// the caller removes leftovers by prefix after a SIGKILL.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"golang.org/x/sys/unix"
)

const credsPath = "/latest/meta-data/iam/security-credentials/"

// mono is CLOCK_MONOTONIC in seconds, the clock Python's time.monotonic() reads.
func mono() float64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return float64(ts.Sec) + float64(ts.Nsec)/1e9
}

func ms(d float64) float64 { return d * 1000 }

// ---- options ------------------------------------------------------------------------------

type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(s string) error { *m = append(*m, s); return nil }

type opts struct {
	conflists   multi
	binDir      string
	cacheDir    string
	prefix      string
	pods        int
	batch       int
	perPod      int
	cached      int
	role        string
	namespace   string
	host        string
	spec        string
	workers     int
	seconds     float64
	maxCycles   int
	requests    int
	steadyRate  float64
	deadline    time.Duration
	reqTimeout  time.Duration
	parallelism int
	mountNS     string
	targets     multi
	rate        float64
	count       int
	keepalive   bool
	path        string
}

// ---- plugin timing ----------------------------------------------------------------------------

// timedExec is libcni's default plugin executor, timing every plugin run by plugin and command
// (e.g. "iamlink ADD"), so a chain's cost splits into its plugins without wrapping them.
type timedExec struct {
	*invoke.DefaultExec
	mu    sync.Mutex
	times map[string][]float64
}

func (e *timedExec) ExecPlugin(ctx context.Context, path string, stdin []byte, env []string) ([]byte, error) {
	cmd := ""
	for _, kv := range env {
		if strings.HasPrefix(kv, "CNI_COMMAND=") {
			cmd = strings.TrimPrefix(kv, "CNI_COMMAND=")
		}
	}
	t := mono()
	out, err := e.DefaultExec.ExecPlugin(ctx, path, stdin, env)
	d := ms(mono() - t)
	if cmd == "ADD" || cmd == "DEL" {
		k := filepath.Base(path) + " " + cmd
		e.mu.Lock()
		e.times[k] = append(e.times[k], d)
		e.mu.Unlock()
	}
	return out, err
}

func (e *timedExec) take() map[string][]float64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	t := e.times
	e.times = map[string][]float64{}
	return t
}

// ---- pods -----------------------------------------------------------------------------------

type runtimeT struct {
	cni      *libcni.CNIConfig
	exec     *timedExec
	prefix   string
	mountNS  string
	seq      int64
	mu       sync.Mutex
	netns    map[string]bool // live pod namespaces we made
	attached map[string]*pod // live CNI attachments (cid -> pod)
}

type pod struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	Role      string `json:"role"`
	netns     string
	cid       string
	uid       string
	list      *libcni.NetworkConfigList
	IP        string `json:"ip,omitempty"`
	Netns     string `json:"netns"`
}

func (p *pod) path() string { return filepath.Join("/var/run/netns", p.netns) }

func (p *pod) rt() *libcni.RuntimeConf {
	return &libcni.RuntimeConf{
		ContainerID: p.cid, NetNS: p.path(), IfName: "eth0",
		Args: [][2]string{
			{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", p.Namespace}, {"K8S_POD_NAME", p.Name},
			{"K8S_POD_INFRA_CONTAINER_ID", p.cid}, {"K8S_POD_UID", p.uid},
		},
	}
}

func randHex(n int) string {
	b := make([]byte, n)
	if _, err := io.ReadFull(randReader, b); err != nil {
		panic(err)
	}
	return fmt.Sprintf("%x", b)
}

var randReader io.Reader

func (r *runtimeT) newPod(list *libcni.NetworkConfigList, ns, name, role string) (*pod, error) {
	n := atomic.AddInt64(&r.seq, 1)
	p := &pod{Namespace: ns, Name: name, Role: role, list: list, cid: randHex(32), uid: randHex(16),
		netns: fmt.Sprintf("%s-%d", r.prefix, n)}
	if out, err := r.ipNetns("add", p.netns).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ip netns add %s: %v: %s", p.netns, err, out)
	}
	r.mu.Lock()
	r.netns[p.netns] = true
	r.mu.Unlock()
	return p, nil
}

func (r *runtimeT) add(ctx context.Context, p *pod) error {
	r.mu.Lock()
	r.attached[p.cid] = p
	r.mu.Unlock()
	res, err := r.cni.AddNetworkList(ctx, p.list, p.rt())
	if err != nil {
		return fmt.Errorf("ADD %s/%s: %w", p.Namespace, p.Name, err)
	}
	var parsed struct {
		IPs []struct {
			Address string `json:"address"`
		} `json:"ips"`
	}
	var b strings.Builder
	if res.PrintTo(&b) == nil && json.Unmarshal([]byte(b.String()), &parsed) == nil && len(parsed.IPs) > 0 {
		p.IP = strings.Split(parsed.IPs[0].Address, "/")[0]
	}
	return nil
}

func (r *runtimeT) del(ctx context.Context, p *pod) error {
	err := r.cni.DelNetworkList(ctx, p.list, p.rt())
	if err == nil {
		r.mu.Lock()
		delete(r.attached, p.cid)
		r.mu.Unlock()
	}
	return err
}

// ipNetns runs `ip netns CMD NAME` in the caller's mount namespace (--mount-ns): `ip netns exec`
// gave this process a private one, and pod namespaces must be visible outside it (wrk runs in
// them) and removable by the caller after a crash.
func (r *runtimeT) ipNetns(cmd, name string) *exec.Cmd {
	if r.mountNS == "" {
		return exec.Command("ip", "netns", cmd, name)
	}
	return exec.Command("nsenter", "--mount="+r.mountNS, "ip", "netns", cmd, name)
}

func (r *runtimeT) dropNetns(p *pod) {
	_ = r.ipNetns("del", p.netns).Run()
	r.mu.Lock()
	delete(r.netns, p.netns)
	r.mu.Unlock()
}

// cleanup DELs every attachment still live and removes every namespace we made (bounded).
func (r *runtimeT) cleanup() {
	r.mu.Lock()
	pods := make([]*pod, 0, len(r.attached))
	for _, p := range r.attached {
		pods = append(pods, p)
	}
	names := make([]string, 0, len(r.netns))
	for n := range r.netns {
		names = append(names, n)
	}
	r.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, p := range pods {
		_ = r.del(ctx, p)
	}
	for _, n := range names {
		_ = r.ipNetns("del", n).Run()
	}
	r.mu.Lock()
	r.netns = map[string]bool{}
	r.attached = map[string]*pod{}
	r.mu.Unlock()
}

// ---- requests from inside a pod ---------------------------------------------------------------

// inPod runs fn on a goroutine whose OS thread has entered the pod's network namespace; the
// thread is never handed back (the goroutine exits locked, so Go ends the thread).
func inPod(p *pod, fn func()) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		f, err := os.Open(p.path())
		if err != nil {
			errc <- err
			return
		}
		err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
		f.Close()
		if err != nil {
			errc <- fmt.Errorf("setns %s: %w", p.netns, err)
			return
		}
		errc <- nil
		fn()
	}()
	return <-errc
}

type answer struct {
	Status int     `json:"status"`
	AKID   string  `json:"akid,omitempty"`
	Err    string  `json:"error,omitempty"`
	Start  float64 `json:"start"`
	End    float64 `json:"end"`
}

// get makes one GET on a new connection (Connection: close), as SDK credential fetches do.
// It must run on a thread inside the pod's namespace (the socket is made here).
func get(host, path string, timeout time.Duration) answer {
	a := answer{Start: mono()}
	conn, err := net.DialTimeout("tcp", net.JoinHostPort(host, "80"), timeout)
	if err != nil {
		a.Err, a.End = errKind(err), mono()
		return a
	}
	a = exchange(conn, host, path, timeout, a)
	return a
}

func exchange(conn net.Conn, host, path string, timeout time.Duration, a answer) answer {
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(timeout))
	if _, err := fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", path, host); err != nil {
		a.Err, a.End = errKind(err), mono()
		return a
	}
	return readAnswer(conn, a)
}

func readAnswer(conn net.Conn, a answer) answer {
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		a.Err, a.End = errKind(err), mono()
		return a
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	a.End = mono()
	a.Status = resp.StatusCode
	if err != nil {
		a.Err = errKind(err)
		return a
	}
	if resp.StatusCode == 200 {
		var doc struct {
			Code, AccessKeyId string
		}
		if json.Unmarshal(body, &doc) != nil || doc.Code != "Success" || doc.AccessKeyId == "" {
			a.Err = "bad-document"
		} else {
			a.AKID = doc.AccessKeyId
		}
	}
	return a
}

func errKind(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.Is(err, syscall.ECONNRESET):
		return "reset"
	case errors.Is(err, syscall.ENETUNREACH):
		return "unreachable"
	case errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
		return "eof"
	}
	return err.Error()
}

// tally counts answers per pod: statuses, errors, and the AccessKeyIds served.
type tally struct {
	Namespace string         `json:"namespace"`
	Name      string         `json:"name"`
	Role      string         `json:"role"`
	Statuses  map[string]int `json:"statuses"`
	AKIDs     map[string]int `json:"akids"`
}

func newTally(p *pod) *tally {
	return &tally{Namespace: p.Namespace, Name: p.Name, Role: p.Role, Statuses: map[string]int{}, AKIDs: map[string]int{}}
}

func (t *tally) add(a answer) {
	k := fmt.Sprint(a.Status)
	if a.Err != "" {
		k = a.Err
	}
	t.Statuses[k]++
	if a.AKID != "" {
		t.AKIDs[a.AKID]++
	}
}

// ---- modes ----------------------------------------------------------------------------------

func loadList(path string) (*libcni.NetworkConfigList, error) {
	return libcni.ConfListFromFile(path)
}

func splitNamed(s string) (string, string) {
	name, file, ok := strings.Cut(s, "=")
	if !ok {
		return filepath.Base(s), s
	}
	return name, file
}

func modeCost(ctx context.Context, r *runtimeT, o *opts) (any, error) {
	type chain struct {
		Name    string `json:"name"`
		list    *libcni.NetworkConfigList
		AddMs   []float64            `json:"add_ms"`
		DelMs   []float64            `json:"del_ms"`
		Plugins map[string][]float64 `json:"plugins_ms"`
	}
	var chains []*chain
	for _, c := range o.conflists {
		name, file := splitNamed(c)
		list, err := loadList(file)
		if err != nil {
			return nil, err
		}
		chains = append(chains, &chain{Name: name, list: list, Plugins: map[string][]float64{}})
	}
	batch := o.batch
	if batch <= 0 || batch > o.pods {
		batch = o.pods
	}
	start := mono()
	for done, round := 0, 0; done < o.pods; done, round = done+batch, round+1 {
		n := batch
		if o.pods-done < n {
			n = o.pods - done
		}
		for k := range chains {
			c := chains[(k+round)%len(chains)] // alternate which chain goes first
			r.exec.take()
			pods := make([]*pod, 0, n)
			for i := 0; i < n; i++ {
				p, err := r.newPod(c.list, o.namespace, fmt.Sprintf("%s-%d", c.Name, done+i), "")
				if err != nil {
					return nil, err
				}
				pods = append(pods, p)
			}
			for _, p := range pods {
				t := mono()
				if err := r.add(ctx, p); err != nil {
					return nil, err
				}
				c.AddMs = append(c.AddMs, ms(mono()-t))
			}
			for _, p := range pods {
				t := mono()
				if err := r.del(ctx, p); err != nil {
					return nil, fmt.Errorf("DEL %s: %w", p.Name, err)
				}
				c.DelMs = append(c.DelMs, ms(mono()-t))
				r.dropNetns(p)
			}
			for k, v := range r.exec.take() {
				c.Plugins[k] = append(c.Plugins[k], v...)
			}
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
	}
	return map[string]any{"chains": chains, "seconds": mono() - start}, nil
}

func modeFirst(ctx context.Context, r *runtimeT, o *opts) (any, error) {
	list, err := loadList(o.conflists[0])
	if err != nil {
		return nil, err
	}
	type sample struct {
		Pod      string    `json:"pod"`
		AddStart float64   `json:"add_start"`
		AddEnd   float64   `json:"add_end"`
		AddMs    float64   `json:"add_ms"`
		FirstMs  float64   `json:"first_ms"`
		First    answer    `json:"first"`
		CachedMs []float64 `json:"cached_ms"`
		Cached   []answer  `json:"cached"`
	}
	var samples []sample
	for i := 0; i < o.pods && ctx.Err() == nil; i++ {
		p, err := r.newPod(list, o.namespace, fmt.Sprintf("first-%d", i), o.role)
		if err != nil {
			return nil, err
		}
		// The requester waits inside the pod's namespace before ADD, so nothing but the
		// request itself lies between ADD returning and the answer.
		do := make(chan struct{})
		got := make(chan answer)
		if err := inPod(p, func() {
			for range do {
				got <- get(o.host, credsPath+o.role, o.reqTimeout)
			}
		}); err != nil {
			return nil, err
		}
		s := sample{Pod: p.Namespace + "/" + p.Name, AddStart: mono()}
		if err := r.add(ctx, p); err != nil {
			close(do)
			return nil, err
		}
		s.AddEnd = mono()
		s.AddMs = ms(s.AddEnd - s.AddStart)
		do <- struct{}{}
		s.First = <-got
		s.FirstMs = ms(s.First.End - s.AddEnd)
		for k := 0; k < o.cached; k++ {
			t := mono()
			do <- struct{}{}
			a := <-got
			s.Cached = append(s.Cached, a)
			s.CachedMs = append(s.CachedMs, ms(a.End-t))
		}
		close(do)
		if err := r.del(ctx, p); err != nil {
			return nil, err
		}
		r.dropNetns(p)
		samples = append(samples, s)
	}
	return map[string]any{"samples": samples}, nil
}

// addAll ADDs pods with `parallelism` workers; returns the first error.
func addAll(ctx context.Context, r *runtimeT, pods []*pod, parallelism int) error {
	if parallelism < 1 {
		parallelism = 1
	}
	var wg sync.WaitGroup
	var first error
	var mu sync.Mutex
	next := int64(-1)
	for w := 0; w < parallelism; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(atomic.AddInt64(&next, 1))
				if i >= len(pods) || ctx.Err() != nil {
					return
				}
				if err := r.add(ctx, pods[i]); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
					return
				}
			}
		}()
	}
	wg.Wait()
	return first
}

func delAll(ctx context.Context, r *runtimeT, pods []*pod) error {
	var first error
	for _, p := range pods {
		if err := r.del(ctx, p); err != nil && first == nil {
			first = err
		}
		r.dropNetns(p)
	}
	return first
}

func event(v map[string]any) {
	b, _ := json.Marshal(v)
	fmt.Println(string(b))
}

func modeBurst(ctx context.Context, r *runtimeT, o *opts) (any, error) {
	list, err := loadList(o.conflists[0])
	if err != nil {
		return nil, err
	}
	var pods []*pod
	for i := 0; i < o.pods; i++ {
		p, err := r.newPod(list, o.namespace, fmt.Sprintf("burst-%d", i), o.role)
		if err != nil {
			return nil, err
		}
		pods = append(pods, p)
	}
	t0 := mono()
	if err := addAll(ctx, r, pods, o.parallelism); err != nil {
		return nil, err
	}
	event(map[string]any{"event": "added", "pods": len(pods), "seconds": mono() - t0})

	// Connect and send everything first; read nothing until every request is out.
	type conn struct {
		c net.Conn
		p int
		a answer
	}
	var conns []*conn
	var mu sync.Mutex
	var sendErrs []string
	for i, p := range pods {
		i := i
		done := make(chan struct{})
		if err := inPod(p, func() {
			defer close(done)
			for k := 0; k < o.perPod; k++ {
				a := answer{Start: mono()}
				c, err := net.DialTimeout("tcp", net.JoinHostPort(o.host, "80"), o.reqTimeout)
				if err == nil {
					_, err = fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", credsPath+o.role, o.host)
				}
				mu.Lock()
				if err != nil {
					sendErrs = append(sendErrs, errKind(err))
				} else {
					conns = append(conns, &conn{c: c, p: i, a: a})
				}
				mu.Unlock()
			}
		}); err != nil {
			return nil, err
		}
		<-done
	}
	event(map[string]any{"event": "sent", "connections": len(conns), "send_errors": len(sendErrs), "t": mono()})
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Add(1)
		go func(c *conn) {
			defer wg.Done()
			_ = c.c.SetDeadline(time.Now().Add(o.deadline))
			c.a = readAnswer(c.c, c.a)
			c.c.Close()
		}(c)
	}
	wg.Wait()
	tallies := make([]*tally, len(pods))
	for i, p := range pods {
		tallies[i] = newTally(p)
	}
	var lat []float64
	lastEnd := 0.0
	for _, c := range conns {
		tallies[c.p].add(c.a)
		if c.a.Err == "" {
			lat = append(lat, ms(c.a.End-c.a.Start))
			if c.a.End > lastEnd {
				lastEnd = c.a.End
			}
		}
	}
	if err := delAll(ctx, r, pods); err != nil {
		return nil, err
	}
	return map[string]any{"pods": tallies, "send_errors": sendErrs, "latency_ms": lat, "last_answer": lastEnd}, nil
}

type specEntry struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	Role      string `json:"role"`
	Steady    bool   `json:"steady"`
}

func readSpec(path string) ([]specEntry, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var spec []specEntry
	return spec, json.Unmarshal(b, &spec)
}

// requestPath is what a pod asks for: its own role's credentials; a pod without a role asks for
// `probe` (and must get 404).
func requestPath(p *pod, probe string) string {
	if p.Role == "" {
		return credsPath + probe
	}
	return credsPath + p.Role
}

func modeHold(ctx context.Context, r *runtimeT, o *opts) (any, error) {
	list, err := loadList(o.conflists[0])
	if err != nil {
		return nil, err
	}
	spec, err := readSpec(o.spec)
	if err != nil {
		return nil, err
	}
	var pods []*pod
	for _, e := range spec {
		p, err := r.newPod(list, e.Namespace, e.Name, e.Role)
		if err != nil {
			return nil, err
		}
		pods = append(pods, p)
	}
	t0 := mono()
	if err := addAll(ctx, r, pods, o.parallelism); err != nil {
		return nil, err
	}
	for _, p := range pods {
		p.Netns = p.netns
	}
	event(map[string]any{"event": "ready", "pods": pods, "seconds": mono() - t0})
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() && ctx.Err() == nil {
		cmd := strings.TrimSpace(in.Text())
		if cmd == "delete" {
			break
		}
		if cmd != "request" {
			continue
		}
		var tallies []*tally
		for _, p := range pods {
			t := newTally(p)
			got := make(chan answer, 1)
			if err := inPod(p, func() { got <- get(o.host, requestPath(p, o.role), o.reqTimeout) }); err != nil {
				return nil, err
			}
			t.add(<-got)
			tallies = append(tallies, t)
		}
		event(map[string]any{"event": "answers", "pods": tallies})
	}
	t1 := mono()
	if err := delAll(ctx, r, pods); err != nil {
		return nil, err
	}
	return map[string]any{"deleted": len(pods), "seconds": mono() - t1}, nil
}

func percentile(xs []float64, q float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	i := int(q*float64(len(s)-1) + 0.5)
	return s[i]
}

func modeChurn(ctx context.Context, r *runtimeT, o *opts) (any, error) {
	list, err := loadList(o.conflists[0])
	if err != nil {
		return nil, err
	}
	spec, err := readSpec(o.spec)
	if err != nil {
		return nil, err
	}
	var tenants []specEntry
	var steadyPods []*pod
	for _, e := range spec {
		if !e.Steady {
			tenants = append(tenants, e)
			continue
		}
		p, err := r.newPod(list, e.Namespace, e.Name, e.Role)
		if err != nil {
			return nil, err
		}
		steadyPods = append(steadyPods, p)
	}
	if len(tenants) == 0 {
		return nil, errors.New("spec has no churn tenants (entries without steady)")
	}
	if err := addAll(ctx, r, steadyPods, 1); err != nil {
		return nil, err
	}
	probe := ""
	for _, e := range spec {
		if e.Role != "" {
			probe = e.Role
			break
		}
	}

	// Steady requesters: a request stream at steadyRate per pod for the whole run.
	stop := make(chan struct{})
	var steadyWG sync.WaitGroup
	steadyTallies := make([]*tally, len(steadyPods))
	for i, p := range steadyPods {
		t := newTally(p)
		steadyTallies[i] = t
		steadyWG.Add(1)
		p := p
		if err := inPod(p, func() {
			defer steadyWG.Done()
			every := time.Duration(float64(time.Second) / o.steadyRate)
			tick := time.NewTicker(every)
			defer tick.Stop()
			for {
				select {
				case <-stop:
					return
				case <-tick.C:
					t.add(get(o.host, requestPath(p, probe), o.reqTimeout))
				}
			}
		}); err != nil {
			steadyWG.Done()
			return nil, err
		}
	}

	type cycle struct {
		T       float64 `json:"t"`
		AddMs   float64 `json:"add_ms"`
		DelMs   float64 `json:"del_ms"`
		Tally   *tally  `json:"tally"`
		IP      string  `json:"ip"`
		TotalMs float64 `json:"total_ms"`
	}
	var mu sync.Mutex
	var cycles []cycle
	var firstErr error
	var n int64 = -1
	start := mono()
	end := start + o.seconds
	var wg sync.WaitGroup
	for w := 0; w < o.workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil && mono() < end {
				i := int(atomic.AddInt64(&n, 1))
				if i >= o.maxCycles {
					return
				}
				e := tenants[i%len(tenants)]
				c := cycle{T: mono()}
				fail := func(err error) {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
				}
				p, err := r.newPod(list, e.Namespace, fmt.Sprintf("%s-%d", e.Name, i), e.Role)
				if err != nil {
					fail(err)
					return
				}
				t := mono()
				if err := r.add(ctx, p); err != nil {
					fail(err)
					r.dropNetns(p)
					return
				}
				c.AddMs = ms(mono() - t)
				c.IP = p.IP
				c.Tally = newTally(p)
				done := make(chan struct{})
				if err := inPod(p, func() {
					defer close(done)
					for k := 0; k < o.requests; k++ {
						c.Tally.add(get(o.host, requestPath(p, probe), o.reqTimeout))
					}
				}); err != nil {
					fail(err)
					return
				}
				<-done
				t = mono()
				if err := r.del(ctx, p); err != nil {
					fail(err)
					return
				}
				c.DelMs = ms(mono() - t)
				r.dropNetns(p)
				c.TotalMs = ms(mono() - c.T)
				mu.Lock()
				cycles = append(cycles, c)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	elapsed := mono() - start
	close(stop)
	steadyWG.Wait()
	if err := delAll(ctx, r, steadyPods); err != nil && firstErr == nil {
		firstErr = err
	}
	if firstErr != nil {
		return nil, firstErr
	}
	return map[string]any{"cycles": cycles, "seconds": elapsed, "steady": steadyTallies}, nil
}

// modeProbe sends requests at a fixed rate from inside existing pod namespaces (--target, names
// under /var/run/netns) and times each: latency without the queueing a closed-loop load
// generator adds. --keepalive reuses one connection per pod; else one connection per request.
func modeProbe(ctx context.Context, r *runtimeT, o *opts) (any, error) {
	type result struct {
		Netns     string         `json:"netns"`
		LatencyMs []float64      `json:"latency_ms"`
		Errors    int            `json:"errors"`
		Statuses  map[string]int `json:"statuses"`
	}
	var results []*result
	var wg sync.WaitGroup
	for _, name := range o.targets {
		res := &result{Netns: name, Statuses: map[string]int{}}
		results = append(results, res)
		p := &pod{netns: name}
		wg.Add(1)
		if err := inPod(p, func() {
			defer wg.Done()
			every := time.Duration(float64(time.Second) / o.rate)
			next := time.Now()
			var conn net.Conn
			var br *bufio.Reader
			for i := 0; i < o.count && ctx.Err() == nil; i++ {
				time.Sleep(time.Until(next))
				next = next.Add(every)
				a := answer{Start: mono()}
				if !o.keepalive || conn == nil {
					c, err := net.DialTimeout("tcp", net.JoinHostPort(o.host, "80"), o.reqTimeout)
					if err != nil {
						res.Errors++
						continue
					}
					conn, br = c, bufio.NewReader(c)
				}
				hdr := "Connection: close\r\n"
				if o.keepalive {
					hdr = ""
				}
				_ = conn.SetDeadline(time.Now().Add(o.reqTimeout))
				_, err := fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: %s\r\n%s\r\n", o.path, o.host, hdr)
				var resp *http.Response
				if err == nil {
					resp, err = http.ReadResponse(br, nil)
				}
				if err == nil {
					_, err = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
				a.End = mono()
				if err != nil {
					res.Errors++
					conn.Close()
					conn = nil
					continue
				}
				res.Statuses[fmt.Sprint(resp.StatusCode)]++
				res.LatencyMs = append(res.LatencyMs, ms(a.End-a.Start))
				if !o.keepalive {
					conn.Close()
					conn = nil
				}
			}
			if conn != nil {
				conn.Close()
			}
		}); err != nil {
			wg.Done()
			return nil, err
		}
	}
	wg.Wait()
	return results, nil
}

// ---- main -------------------------------------------------------------------------------------

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: cnibench cost|first|burst|hold|churn [flags]")
		os.Exit(2)
	}
	mode := os.Args[1]
	o := &opts{}
	fs := flag.NewFlagSet(mode, flag.ExitOnError)
	fs.Var(&o.conflists, "conflist", "conflist file (cost: NAME=FILE, repeatable)")
	fs.StringVar(&o.binDir, "bin-dir", "/usr/lib/cni", "plugin directories, ':'-separated")
	fs.StringVar(&o.cacheDir, "cache-dir", "", "libcni result cache (required)")
	fs.StringVar(&o.prefix, "netns-prefix", "iamlink-pod-bench", "pod namespace name prefix")
	fs.IntVar(&o.pods, "pods", 10, "pods")
	fs.IntVar(&o.batch, "batch", 25, "cost: pods per batch")
	fs.IntVar(&o.perPod, "per-pod", 10, "burst: connections per pod")
	fs.IntVar(&o.cached, "cached", 3, "first: cached GETs after the first")
	fs.StringVar(&o.role, "role", "", "role name the pods ask for")
	fs.StringVar(&o.namespace, "namespace", "bench", "pod namespace (Kubernetes)")
	fs.StringVar(&o.host, "host", "169.254.169.254", "metadata address")
	fs.StringVar(&o.spec, "spec", "", "hold/churn: JSON pod list")
	fs.IntVar(&o.workers, "workers", 2, "churn: parallel pod lifecycles")
	fs.Float64Var(&o.seconds, "seconds", 10, "churn: duration")
	fs.IntVar(&o.maxCycles, "max-cycles", 100000, "churn: at most this many pods")
	fs.IntVar(&o.requests, "requests", 3, "churn: GETs per churned pod")
	fs.Float64Var(&o.steadyRate, "steady-rate", 100, "churn: GETs per second per steady pod")
	fs.DurationVar(&o.deadline, "deadline", 120*time.Second, "overall deadline")
	fs.DurationVar(&o.reqTimeout, "request-timeout", 5*time.Second, "per request")
	fs.IntVar(&o.parallelism, "parallelism", 2, "burst/hold: parallel ADDs")
	fs.Var(&o.targets, "target", "probe: pod namespace name (repeatable)")
	fs.Float64Var(&o.rate, "rate", 500, "probe: requests per second per pod")
	fs.IntVar(&o.count, "count", 1000, "probe: requests per pod")
	fs.BoolVar(&o.keepalive, "keepalive", false, "probe: one connection per pod")
	fs.StringVar(&o.path, "path", credsPath, "probe: request path")
	fs.StringVar(&o.mountNS, "mount-ns", "", "mount namespace (e.g. /proc/PID/ns/mnt) to make pod namespaces in")
	_ = fs.Parse(os.Args[2:])
	if mode != "probe" && (o.cacheDir == "" || len(o.conflists) == 0) {
		fmt.Fprintln(os.Stderr, "cnibench: --cache-dir and --conflist are required")
		os.Exit(2)
	}
	f, err := os.Open("/dev/urandom")
	if err != nil {
		panic(err)
	}
	randReader = f

	te := &timedExec{DefaultExec: &invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: os.Stderr}},
		times: map[string][]float64{}}
	r := &runtimeT{
		cni:      libcni.NewCNIConfigWithCacheDir(filepath.SplitList(o.binDir), o.cacheDir, te),
		exec:     te,
		prefix:   o.prefix,
		mountNS:  o.mountNS,
		netns:    map[string]bool{},
		attached: map[string]*pod{},
	}
	ctx, cancel := context.WithTimeout(context.Background(), o.deadline)
	defer cancel()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	go func() {
		<-sigs
		cancel()
		r.cleanup()
		os.Exit(3)
	}()

	modes := map[string]func(context.Context, *runtimeT, *opts) (any, error){
		"cost": modeCost, "first": modeFirst, "probe": modeProbe, "burst": modeBurst, "hold": modeHold, "churn": modeChurn,
	}
	run, ok := modes[mode]
	if !ok {
		fmt.Fprintf(os.Stderr, "cnibench: unknown mode %q\n", mode)
		os.Exit(2)
	}
	out, err := run(ctx, r, o)
	r.cleanup()
	if err != nil {
		fmt.Fprintf(os.Stderr, "cnibench %s: %v\n", mode, err)
		event(map[string]any{"error": err.Error()})
		os.Exit(1)
	}
	b, err := json.Marshal(out)
	if err != nil {
		fmt.Fprintf(os.Stderr, "cnibench: %v\n", err)
		os.Exit(1)
	}
	fmt.Println(string(b))
}
