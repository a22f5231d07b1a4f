// Built by scripts/build-console.sh into dist/, which crates/hangar-console embeds into the
// hangar binary; served at /console/. No CDN, no external fonts: everything is in dist/.
import { defineConfig } from 'vite';

export default defineConfig({
  base: '/console/',
  oxc: { jsx: { runtime: 'automatic', importSource: 'preact' } },
  build: {
    outDir: 'dist',
    emptyOutDir: true,
    assetsInlineLimit: 0,
    modulePreload: { polyfill: false },
    sourcemap: false,
  },
});
