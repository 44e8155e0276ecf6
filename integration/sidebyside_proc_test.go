package integration

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// What BenchmarkSideBySide reads of a process, from /proc (Linux only).

// clockTicksPerSecond is USER_HZ, the unit of utime and stime in
// /proc/PID/stat (sysconf(_SC_CLK_TCK)): the kernel fixes it at 100 on
// every architecture Go runs on.
const clockTicksPerSecond = 100

// processTree returns pid and its descendants (nginx's master and worker),
// from /proc/PID/task/TID/children.
func processTree(pid int) []int {
	tree := []int{pid}
	for i := 0; i < len(tree); i++ {
		tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", tree[i]))
		for _, task := range tasks {
			children, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", tree[i], task.Name()))
			for _, f := range strings.Fields(string(children)) {
				if child, err := strconv.Atoi(f); err == nil {
					tree = append(tree, child)
				}
			}
		}
	}
	return tree
}

// cpuTicks is the user and system CPU time the processes have used, in
// clock ticks; a process that is gone counts 0.
func cpuTicks(pids []int) int64 {
	var total int64
	for _, pid := range pids {
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		total += statCPUTicks(string(stat))
	}
	return total
}

// statCPUTicks returns utime+stime from a /proc/PID/stat line. The fields
// are counted after the command name's closing parenthesis, since the name
// may hold spaces and parentheses itself.
func statCPUTicks(stat string) int64 {
	rest := stat[strings.LastIndexByte(stat, ')')+1:]
	f := strings.Fields(rest) // f[0] is field 3 (state): utime is field 14, stime 15
	if len(f) < 13 {
		return 0
	}
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return utime + stime
}

// rssKiB is the processes' resident memory (VmRSS) in KiB.
func rssKiB(pids []int) int64 {
	var total int64
	for _, pid := range pids {
		total += statusField(pid, "VmRSS")
	}
	return total
}

// statusField returns a numeric field of /proc/PID/status, 0 if absent.
func statusField(pid int, name string) int64 {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(status), "\n") {
		if value, ok := strings.CutPrefix(line, name+":"); ok {
			n, _ := strconv.ParseInt(strings.Fields(value)[0], 10, 64)
			return n
		}
	}
	return 0
}

// cpusAllowed returns the Cpus_allowed_list of /proc/PID/status ("1").
func cpusAllowed(pid int) string {
	status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, line := range strings.Split(string(status), "\n") {
		if value, ok := strings.CutPrefix(line, "Cpus_allowed_list:"); ok {
			return strings.TrimSpace(value)
		}
	}
	return ""
}

// fdCount is the number of open file descriptors of the processes.
func fdCount(pids []int) int {
	total := 0
	for _, pid := range pids {
		fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		total += len(fds)
	}
	return total
}

// pinning says where the benchmark runs what: the load generator and
// backends (this test process) on one CPU, each proxy alone on another.
type pinning struct {
	load, proxy int    // CPU numbers; -1 when nothing is pinned
	why         string // why nothing is pinned
}

// pinLoadGenerator moves every thread of this process onto the first CPU
// it may use and sets GOMAXPROCS to 1; threads the runtime starts later
// inherit the CPU from the thread that starts them. The proxies get the
// second CPU. Both are undone when the benchmark ends. With fewer than two
// CPUs, or without taskset to start the proxies on theirs, nothing is
// pinned and the table says so.
func pinLoadGenerator(b *testing.B) pinning {
	var all unix.CPUSet
	if err := unix.SchedGetaffinity(0, &all); err != nil {
		return pinning{load: -1, proxy: -1, why: fmt.Sprintf("sched_getaffinity: %v", err)}
	}
	var cpus []int
	for cpu := 0; cpu < len(all)*64 && len(cpus) < 2; cpu++ {
		if all.IsSet(cpu) {
			cpus = append(cpus, cpu)
		}
	}
	if len(cpus) < 2 {
		return pinning{load: -1, proxy: -1, why: "this process may use only one CPU"}
	}
	if findProgram("taskset") == "" {
		return pinning{load: -1, proxy: -1, why: "taskset (util-linux) is not installed"}
	}
	var load unix.CPUSet
	load.Set(cpus[0])
	if err := setThreadsAffinity(&load); err != nil {
		b.Fatalf("pinning the load generator to CPU %d: %v", cpus[0], err)
	}
	prev := runtime.GOMAXPROCS(1)
	b.Cleanup(func() {
		runtime.GOMAXPROCS(prev)
		if err := setThreadsAffinity(&all); err != nil {
			b.Errorf("unpinning the test process: %v", err)
		}
	})
	return pinning{load: cpus[0], proxy: cpus[1]}
}

// setThreadsAffinity sets the CPU set of every thread of this process,
// listing them again until no new one has appeared (one may be started
// by a thread that was not moved yet).
func setThreadsAffinity(set *unix.CPUSet) error {
	done := map[int]bool{}
	for pass := 0; pass < 100; pass++ {
		tasks, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return err
		}
		moved := false
		for _, task := range tasks {
			tid, err := strconv.Atoi(task.Name())
			if err != nil || done[tid] {
				continue
			}
			if err := unix.SchedSetaffinity(tid, set); err != nil && err != unix.ESRCH {
				return fmt.Errorf("thread %d: %w", tid, err)
			}
			done[tid], moved = true, true
		}
		if !moved {
			return nil
		}
	}
	return fmt.Errorf("threads kept appearing")
}

// cpuTimes are one CPU's counters from /proc/stat, in clock ticks.
type cpuTimes struct{ idle, total int64 }

// readCPUTimes reads the counters of CPU cpu (-1: all CPUs together).
func readCPUTimes(cpu int) cpuTimes {
	name := "cpu"
	if cpu >= 0 {
		name += strconv.Itoa(cpu)
	}
	stat, _ := os.ReadFile("/proc/stat")
	for _, line := range strings.Split(string(stat), "\n") {
		f := strings.Fields(line)
		if len(f) < 6 || f[0] != name {
			continue
		}
		var t cpuTimes
		for i, v := range f[1:] {
			n, _ := strconv.ParseInt(v, 10, 64)
			if i < 8 { // user nice system idle iowait irq softirq steal; guest time is in user already
				t.total += n
			}
			if i == 3 || i == 4 { // idle, iowait
				t.idle += n
			}
		}
		return t
	}
	return cpuTimes{}
}

// idleSince is the share of the time since then that the CPU was idle.
func (t cpuTimes) idleSince(then cpuTimes) float64 {
	return float64(t.idle-then.idle) / float64(t.total-then.total)
}

// loadAverage is the first field of /proc/loadavg: runnable processes,
// averaged over a minute.
func loadAverage() string {
	avg, _ := os.ReadFile("/proc/loadavg")
	if f := strings.Fields(string(avg)); len(f) > 0 {
		return f[0]
	}
	return "?"
}

// TestStatCPUTicksCountsFieldsAfterTheCommandName: a command name with
// spaces and parentheses must not shift utime and stime.
func TestStatCPUTicksCountsFieldsAfterTheCommandName(t *testing.T) {
	stat := "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 900 0 0 0 1234 567 0 0 20 0 9 0 100 0 0\n"
	if got := statCPUTicks(stat); got != 1234+567 {
		t.Fatalf("statCPUTicks = %d, want %d", got, 1234+567)
	}
}
