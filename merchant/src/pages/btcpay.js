/*
 * Mediator's modal checkout, with BTCPay Server's `btcpay.js` interface (`/modal/btcpay.js`), for
 * shop plugins that open the checkout over their own page (WooCommerce's "modal checkout"):
 *
 *   btcpay.setApiUrlPrefix(serverUrl)   where the checkout pages are (default: this script's origin)
 *   btcpay.showInvoice(invoiceId)       opens the invoice's checkout page in a frame over the page
 *   btcpay.onModalReceiveMessage(f)     f(event) for each message of the checkout frame:
 *                                       "loaded", "close", {invoiceId, status}
 *   btcpay.hideFrame() / showFrame()    closes / shows the frame
 *   btcpay.onModalWillEnter(f) / onModalWillLeave(f)
 *
 * Only messages from the frame this script opened, from the server's origin, are passed on.
 */
(function () {
  "use strict";
  if (window.btcpay && window.btcpay.mediator) return;
  var origin = "";
  try {
    origin = new URL(document.currentScript.src).origin;
  } catch (e) {
    origin = "";
  }
  var frame = null;
  var received = [], entering = [], leaving = [];

  function each(list, arg) {
    list.slice().forEach(function (f) {
      try { f(arg); } catch (e) { setTimeout(function () { throw e; }); }
    });
  }

  function setApiUrlPrefix(url) {
    try { origin = new URL(String(url), location.href).origin; } catch (e) { /* kept */ }
  }

  function showFrame() {
    if (!frame) return;
    frame.style.display = "block";
    each(entering);
  }

  function hideFrame() {
    if (!frame) return;
    var f = frame;
    frame = null;
    if (f.parentNode) f.parentNode.removeChild(f);
    each(leaving);
  }

  function showInvoice(invoiceId) {
    if (frame) hideFrame();
    var f = document.createElement("iframe");
    f.name = "btcpay";
    f.title = "Bitcoin payment";
    f.setAttribute("allow", "clipboard-write");
    f.style.cssText = "position:fixed;top:0;left:0;width:100%;height:100%;border:0;margin:0;" +
      "z-index:2147483647;background:rgba(0,0,0,0.55);display:block;";
    f.src = origin + "/i/" + encodeURIComponent(String(invoiceId)) + "?view=modal";
    frame = f;
    document.body.appendChild(f);
    each(entering);
  }

  window.addEventListener("message", function (event) {
    if (!frame || event.source !== frame.contentWindow || event.origin !== origin) return;
    if (event.data === "close") hideFrame();
    each(received, event);
  });

  window.btcpay = {
    mediator: true,
    setApiUrlPrefix: setApiUrlPrefix,
    showInvoice: showInvoice,
    appendAndShowInvoiceId: showInvoice,
    showFrame: showFrame,
    hideFrame: hideFrame,
    onModalReceiveMessage: function (f) { if (typeof f === "function") received.push(f); },
    onModalWillEnter: function (f) { if (typeof f === "function") entering.push(f); },
    onModalWillLeave: function (f) { if (typeof f === "function") leaving.push(f); }
  };
})();
