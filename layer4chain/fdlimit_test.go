package layer4chain

import "testing"

func TestConnectionLimitLeavesFilesForTheRestOfTheProcess(t *testing.T) {
	for _, tc := range []struct {
		nofile uint64
		want   int
	}{
		{1024, (1024 - 256) / 3},      // a quarter kept back
		{100, (100 - 64) / 3},         // at least 64 kept back
		{1 << 20, (1<<20 - 4096) / 3}, // at most 4096 kept back
		{66, 1},                       // never 0, which would mean no limit
		{1 << 40, 0},                  // unreachable: no limit
	} {
		if got := ConnectionLimitForFiles(tc.nofile); got != tc.want {
			t.Errorf("ConnectionLimitForFiles(%d) = %d, want %d", tc.nofile, got, tc.want)
		}
		if got := ConnectionLimitForFiles(tc.nofile); got > 1 && uint64(3*got) >= tc.nofile {
			t.Errorf("ConnectionLimitForFiles(%d) = %d leaves no file for anything else", tc.nofile, got)
		}
	}
	if nofile, ok := FileLimit(); !ok || nofile < 64 {
		t.Fatalf("FileLimit() = %d, %v", nofile, ok)
	}
}
