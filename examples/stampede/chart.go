package main

import (
	"fmt"
	"math"
	"os"
	"slices"
	"strings"
	"time"
)

// Chart geometry, shared by both charts.
const (
	chartW, chartH        = 900, 420
	chartLeft, chartRight = 70, 20
	chartTop, chartBottom = 50, 50
	plotW, plotH          = chartW - chartLeft - chartRight, chartH - chartTop - chartBottom
)

var chartColors = []string{"#d62728", "#1f77b4", "#2ca02c", "#9467bd"}

// chart is an SVG chart under construction: time on x from 0 to tmax, a
// logarithmic y from lo to hi.
type chart struct {
	b      strings.Builder
	tmax   time.Duration
	lo, hi float64
}

// newChart starts a chart: its title, x grid and label, and y decades
// labelled by yLabel.
func newChart(title, xLabel string, tmax time.Duration, lo, hi float64, yLabel func(float64) string) *chart {
	if tmax <= 0 {
		tmax = time.Second
	}
	c := &chart{tmax: tmax, lo: lo, hi: hi}
	fmt.Fprintf(&c.b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">`+"\n", chartW, chartH)
	fmt.Fprintf(&c.b, `<rect width="%d" height="%d" fill="white"/>`+"\n", chartW, chartH)
	fmt.Fprintf(&c.b, `<text x="%d" y="22" font-size="14">%s</text>`+"\n", chartLeft, escape(title))
	for v := lo; v <= hi*1.0001; v *= 10 {
		fmt.Fprintf(&c.b, `<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#ddd"/>`+"\n", chartLeft, chartW-chartRight, c.y(v), c.y(v))
		fmt.Fprintf(&c.b, `<text x="%d" y="%.1f" text-anchor="end">%s</text>`+"\n", chartLeft-6, c.y(v)+4, yLabel(v))
	}
	step := niceStep(tmax.Seconds())
	for s := 0.0; s <= tmax.Seconds()+1e-9; s += step {
		xs := c.x(time.Duration(s * float64(time.Second)))
		fmt.Fprintf(&c.b, `<line x1="%.1f" x2="%.1f" y1="%d" y2="%d" stroke="#eee"/>`+"\n", xs, xs, chartTop, chartH-chartBottom)
		fmt.Fprintf(&c.b, `<text x="%.1f" y="%d" text-anchor="middle">%gs</text>`+"\n", xs, chartH-chartBottom+16, s)
	}
	fmt.Fprintf(&c.b, `<text x="%d" y="%d" text-anchor="middle">%s</text>`+"\n", chartLeft+plotW/2, chartH-12, xLabel)
	return c
}

func (c *chart) x(t time.Duration) float64 {
	return chartLeft + float64(plotW)*t.Seconds()/c.tmax.Seconds()
}

func (c *chart) y(v float64) float64 {
	v = math.Max(v, c.lo)
	return chartTop + float64(plotH)*(1-(math.Log10(v)-math.Log10(c.lo))/(math.Log10(c.hi)-math.Log10(c.lo)))
}

// reference draws a dashed horizontal line at v, labelled.
func (c *chart) reference(v float64, label string) {
	fmt.Fprintf(&c.b, `<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#555" stroke-dasharray="4 4"/>`+"\n", chartLeft, chartW-chartRight, c.y(v), c.y(v))
	fmt.Fprintf(&c.b, `<text x="%d" y="%.1f" text-anchor="end" fill="#555">%s</text>`+"\n", chartW-chartRight-4, c.y(v)-4, escape(label))
}

// series draws the i-th series, named name, through pts (x, y pairs).
func (c *chart) series(i int, name string, pts []string) {
	col := chartColors[i%len(chartColors)]
	fmt.Fprintf(&c.b, `<polyline fill="none" stroke="%s" stroke-width="1.5" points="%s"/>`+"\n", col, strings.Join(pts, " "))
	lx := chartLeft + 10 + i*160
	fmt.Fprintf(&c.b, `<rect x="%d" y="%d" width="12" height="12" fill="%s"/><text x="%d" y="%d">%s</text>`+"\n", lx, chartTop-16, col, lx+16, chartTop-6, escape(name))
}

func (c *chart) write(path string) error {
	c.b.WriteString("</svg>\n")
	return os.WriteFile(path, []byte(c.b.String()), 0o644)
}

// writeChart draws the bystander's connect latency over time for each run,
// on a logarithmic scale, with the idle connect as a reference line.
func writeChart(path, title, xLabel string, idle time.Duration, rs []runResult) error {
	const minMS, maxMSCeil = 0.5, 100000.0
	var tmax time.Duration
	maxMS := 10.0
	for _, r := range rs {
		for _, s := range r.bystander {
			tmax = max(tmax, s.at)
			if !s.failed {
				maxMS = max(maxMS, float64(s.latency)/float64(time.Millisecond))
			}
		}
	}
	maxMS = math.Min(math.Pow(10, math.Ceil(math.Log10(maxMS))), maxMSCeil)
	c := newChart("Bystander connect latency: "+title, xLabel, tmax, minMS, maxMS, axisMS)
	c.reference(float64(idle)/float64(time.Millisecond), "idle "+ms(idle))
	for i, r := range rs {
		var pts []string
		ss := slices.Clone(r.bystander)
		slices.SortFunc(ss, func(a, b sample) int { return int(a.at - b.at) })
		for _, s := range ss {
			if s.at < 0 || s.failed {
				continue
			}
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", c.x(s.at), c.y(float64(s.latency)/float64(time.Millisecond))))
		}
		c.series(i, r.name, pts)
	}
	return c.write(path)
}

// writeRateChart draws each run's dials per second over time, as steps on
// a logarithmic scale, with the measured capacity as a reference line.
func writeRateChart(path, title, xLabel string, capacity float64, names []string, dials [][]time.Duration) error {
	var tmax time.Duration
	most := 10.0
	perSecond := make([][]int, len(dials))
	for i, ts := range dials {
		for _, t := range ts {
			if t < 0 {
				continue
			}
			s := int(t.Seconds())
			for len(perSecond[i]) <= s {
				perSecond[i] = append(perSecond[i], 0)
			}
			perSecond[i][s]++
			tmax = max(tmax, time.Duration(s+1)*time.Second)
		}
		for _, n := range perSecond[i] {
			most = max(most, float64(n))
		}
	}
	c := newChart("Dials per second: "+title, xLabel, tmax, 1, math.Pow(10, math.Ceil(math.Log10(most))),
		func(v float64) string { return fmt.Sprintf("%g/s", v) })
	c.reference(capacity, fmt.Sprintf("capacity %.0f/s", capacity))
	for i, counts := range perSecond {
		var pts []string
		for s, n := range counts {
			// A second with no dial sits on the axis.
			y := c.y(math.Max(float64(n), 1))
			pts = append(pts, fmt.Sprintf("%.1f,%.1f %.1f,%.1f", c.x(time.Duration(s)*time.Second), y, c.x(time.Duration(s+1)*time.Second), y))
		}
		c.series(i, names[i], pts)
	}
	return c.write(path)
}

func axisMS(v float64) string {
	if v >= 1000 {
		return fmt.Sprintf("%gs", v/1000)
	}
	return fmt.Sprintf("%gms", v)
}

func niceStep(span float64) float64 {
	for _, s := range []float64{1, 2, 5, 10, 20, 30, 60} {
		if span/s <= 12 {
			return s
		}
	}
	return 120
}

func escape(s string) string {
	return strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;").Replace(s)
}
