package main

import (
	"fmt"
	"math"
	"os"
	"slices"
	"strings"
	"time"
)

// writeChart draws the bystander's connect latency over time for each run,
// on a logarithmic scale, with the idle connect as a reference line.
func writeChart(path, title, xLabel string, idle time.Duration, rs []runResult) error {
	const (
		w, h             = 900, 420
		left, right      = 70, 20
		top, bottom      = 50, 50
		plotW, plotH     = w - left - right, h - top - bottom
		minMS, maxMSCeil = 0.5, 100000.0
	)
	colors := []string{"#d62728", "#1f77b4", "#2ca02c", "#9467bd"}
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
	if tmax <= 0 {
		tmax = time.Second
	}
	x := func(t time.Duration) float64 { return left + float64(plotW)*t.Seconds()/tmax.Seconds() }
	y := func(msv float64) float64 {
		msv = math.Max(msv, minMS)
		return top + float64(plotH)*(1-(math.Log10(msv)-math.Log10(minMS))/(math.Log10(maxMS)-math.Log10(minMS)))
	}
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">`+"\n", w, h)
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="white"/>`+"\n", w, h)
	fmt.Fprintf(&b, `<text x="%d" y="22" font-size="14">Bystander connect latency: %s</text>`+"\n", left, escape(title))
	// Grid: decades on y, seconds on x.
	for v := minMS; v <= maxMS*1.0001; v *= 10 {
		fmt.Fprintf(&b, `<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#ddd"/>`+"\n", left, w-right, y(v), y(v))
		fmt.Fprintf(&b, `<text x="%d" y="%.1f" text-anchor="end">%s</text>`+"\n", left-6, y(v)+4, axisMS(v))
	}
	step := niceStep(tmax.Seconds())
	for s := 0.0; s <= tmax.Seconds()+1e-9; s += step {
		xs := x(time.Duration(s * float64(time.Second)))
		fmt.Fprintf(&b, `<line x1="%.1f" x2="%.1f" y1="%d" y2="%d" stroke="#eee"/>`+"\n", xs, xs, top, h-bottom)
		fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle">%gs</text>`+"\n", xs, h-bottom+16, s)
	}
	fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="middle">%s</text>`+"\n", left+plotW/2, h-12, xLabel)
	// Idle reference.
	iv := float64(idle) / float64(time.Millisecond)
	fmt.Fprintf(&b, `<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#555" stroke-dasharray="4 4"/>`+"\n", left, w-right, y(iv), y(iv))
	fmt.Fprintf(&b, `<text x="%d" y="%.1f" text-anchor="end" fill="#555">idle %s</text>`+"\n", w-right-4, y(iv)-4, ms(idle))
	for i, r := range rs {
		c := colors[i%len(colors)]
		var pts []string
		ss := slices.Clone(r.bystander)
		slices.SortFunc(ss, func(a, b sample) int { return int(a.at - b.at) })
		for _, s := range ss {
			if s.at < 0 || s.failed {
				continue
			}
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", x(s.at), y(float64(s.latency)/float64(time.Millisecond))))
		}
		fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="1.5" points="%s"/>`+"\n", c, strings.Join(pts, " "))
		lx := left + 10 + i*160
		fmt.Fprintf(&b, `<rect x="%d" y="%d" width="12" height="12" fill="%s"/><text x="%d" y="%d">%s</text>`+"\n", lx, top-16, c, lx+16, top-6, escape(r.name))
	}
	b.WriteString("</svg>\n")
	return os.WriteFile(path, []byte(b.String()), 0o644)
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
