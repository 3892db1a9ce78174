// Package procstat reads a process's CPU time and peak memory from /proc, for
// the benchmarks and the long tests (Linux only).
package procstat

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// CPUSeconds is a process's user+system CPU time; 0 when it cannot be read.
func CPUSeconds(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	u, _ := strconv.ParseFloat(fields[11], 64)
	k, _ := strconv.ParseFloat(fields[12], 64)
	return (u + k) / 100 // USER_HZ
}

// PeakRSSMiB is a process's peak resident set (VmHWM); 0 when it cannot be read.
func PeakRSSMiB(pid int) int {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			kb, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return kb / 1024
		}
	}
	return 0
}
