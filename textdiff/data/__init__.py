"""Images, masks and reports in; the prepared splits out. Stain, magnification, views and tiles are
the pixel-level conventions every later phase shares."""
